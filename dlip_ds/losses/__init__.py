"""Pretraining objectives (`pretrain`) and the distillation plan (`distill`)."""
