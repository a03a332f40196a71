from kdjax.data import builders  # registers mnist1d, digits
