"""The machinery every phase shares: the jitted step, the optimizer registry, the loop, meshes and hosts,
checkpoints, the workdir's records, TensorBoard, the corpus."""
