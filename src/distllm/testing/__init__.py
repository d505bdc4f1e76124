"""Fakes and helpers shared by distllm's tests and by applications that embed distllm."""
