"""ragline rag package."""

# Hybrid search's (BM25, dense) weights: chosen on SciFact's claims (README: nDCG@10 0.902); the
# library, `ragline search`, routes and the vector-store search API all default to them.
HYBRID_WEIGHTS: tuple[float, float] = (0.4, 0.6)
