"""CoDA cloud data side: MovieLens replay, raw behaviour table, sample generation, user matching."""
