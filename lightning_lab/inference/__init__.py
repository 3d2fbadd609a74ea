"""Sampling from the policy: model loading, the continuous-batching engine and its parts.

Data path: ``Policy.chat/generate`` (policy) → ``Engine`` (engine: a thread that batches requests)
→ ``DecodeBatch`` (decoding: prefill + decode with a KV cache) → ``choose_tokens`` (sampling).
"""
