"""Exporters: one module per target. Each reads a GPTQ checkpoint and stores its codes bit-exactly."""
