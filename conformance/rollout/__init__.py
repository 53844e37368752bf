"""Rollout vs rescore (the "rollout" call mode, modes/rollout.py): a tiny causal LM whose attention
runs through a backend over a paged cache, as an RL framework uses an inference engine.

The model: seeded weights (no downloads), a vocabulary of VOCAB tokens, LAYERS layers of RMSNorm,
attention with rotary positions over the case's heads, and a residual; then RMSNorm and the
unembedding. With a sliding window, the layers alternate full attention and the window (a hybrid
model, as Gemma 2). A case's batch gives the prompts and the samples: P prompts of
shared_prefix_lens tokens (without sharing, each sequence's context is its own prompt) and, per
sample, seq_len - prompt tokens to generate. Through the backend (Rollout.schedule):

- rollout: one prefill call per layer over the P prompts (with a window, in calls of `window`
  tokens, as an engine whose sliding layers keep ring buffers must); each shared prompt is then
  forked into its G samples, which share its blocks (a partly filled last one is copied when a
  sample first writes into it: copy-on-write); then decode calls, one token per sample, each sample
  leaving the batch (and freeing its blocks) when its tokens are in. The tokens are the argmax of
  the log-probabilities plus seeded Gumbel noise (sampling with a fixed draw: the G samples of a
  prompt differ, and a run is reproducible); each token's log-probability is kept.
- rescore: prefill calls over every sample's prompt + generated tokens, as new requests in the
  blocks the rollout freed, giving the same tokens' log-probabilities again.

A KV-cache manager (managers.py; the suite's own unless the runner is given another) hands out
every block, so a manager runs end to end here: a manager bug shows as wrong log-probabilities.
A paged manager (KVCacheManager) holds every layer's blocks; a HybridManager the full and the
sliding layers' tables; a RingBufferManager the sliding layers' slots (the full layers' blocks
are then the suite's).

The truth is the same model in float64 with the reference's attention (explicit masks, logical
K/V), teacher-forced on the generated tokens; the noise that calibrates the tolerance is the model
in the case's dtype with the low-precision reference attention. Both log-probability sets are
judged against the truth with the pass rule, and against each other: a rollout that the rescore
does not reproduce is what breaks RL training (the policy ratio of importance sampling). The tokens
are checked against the float64 model's own choices up to the first difference, which fails unless
the float64 choice was a near tie (margin within the tolerance).

One job a file: schedule.py (what the engine does, in order), model.py (the tiny LM and its float64
and low-precision forms), layouts.py (where each manager's blocks put the model's K/V), drive.py
(the rollout and rescore through a backend, one call at a time) and score.py (the reference
model's log-probs of the generated tokens). The mode (modes/rollout.py) runs them and judges.
"""
