"""ragline rag package."""

# Hybrid search's (BM25, dense) weights: chosen on SciFact's claims (README: nDCG@10 0.902); the
# library, `ragline search`, routes and the vector-store search API all default to them.
HYBRID_WEIGHTS: tuple[float, float] = (0.4, 0.6)

# The relevance floor of grounded answers: a chunk whose cosine similarity to the question (the
# default MiniLM embedder's) is below it is neither put into the prompt nor cited. Chosen by
# 5-fold cross-validation on SciFact's claims as the highest floor that kept >= 99% of the
# relevant chunks of the training folds (0.27, 0.27, 0.28, 0.27, 0.29 across folds); on the
# held-out folds it kept 99.0% of relevant chunks and dropped 74.6% of the chunks retrieved for
# off-topic everyday prompts (the benign half of ../shared/data/prompt-injections).
RELEVANCE_FLOOR: float = 0.27
