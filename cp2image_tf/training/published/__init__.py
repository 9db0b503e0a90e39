"""The published CP2Image model (docs/design/published.md): networks, losses and trainer."""
