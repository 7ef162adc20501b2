"""The trainer: config, step, setup, the loop, the teacher cache, fine-tuning."""
