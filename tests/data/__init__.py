"""Tests of dapo_megatron.data."""
