"""MongoDB, through PyMongo: one store per collection."""
