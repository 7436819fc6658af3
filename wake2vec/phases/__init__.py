"""What each phase does before and around the shared loop: Phase 1's preparation and inits, Phase 2's LoRA,
Phase 3's alignment groups, and reading earlier runs' workdirs."""
