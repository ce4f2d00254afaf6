"""Deployments of trained models behind the OpenAI-compatible gateway: built by issue #5."""
