"""quadsel data plane: reading, validating, embedding, clustering and writing shards."""
