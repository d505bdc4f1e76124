"""The ``distllm`` command line."""
