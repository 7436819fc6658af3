"""The frozen body: the Llama-family model in Flax, its config, conversion from HF and GGUF, quantization,
LoRA adapters and decoding."""
