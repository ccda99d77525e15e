"""Training: LoRA fine-tuning in RAP's data format."""
