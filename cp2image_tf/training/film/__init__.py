"""The film decoder, a documented baseline (docs/design/film.md): networks and trainer."""
