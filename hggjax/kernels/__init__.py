"""Static-shaped building blocks the selectors share, grouped by topic.

- `bits`: float bit patterns as sortable keys; masks packed into uint32 words and
  counted (one pass over the vector, then work on n/32 words).
- `scan`: exact prefix sums of int32 counts, and `materialize`.
- `sampling`: strided and cache-line-blocked samples, and the low cut that a sample
  gives with binomial margins.
- `topk`: compaction of a packed mask into positions, radix select, and the exact
  top-k built from them (with the one rule for when the fast path applies).

Nothing here calls a collective, syncs with the host or loops on data.
"""
