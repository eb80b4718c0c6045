"""The named language-model shapes, as plain data (no JAX or Flax import).

The CLI checks a config against these (model name, context) before any backend starts;
`train.lm.models.create_lm_model` builds the networks from them.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class LMSpec:
  """One model shape. `vocab_size` is the default; the tokenizer overrides it."""
  kind: str                # "transformer" or "lstm"
  layers: int
  width: int               # model width (transformer) or LSTM units
  heads: int               # attention heads; 0 for the LSTM
  context: int | None      # longest sequence (learned positions); None: any length
  vocab_size: int
  tied: bool = True        # output projection = input embedding transposed


PRESETS: dict[str, LMSpec] = {
    # Sized for the default CPU run: about 3.3 M parameters with byte tokens.
    "tiny": LMSpec("transformer", layers=4, width=256, heads=4, context=256, vocab_size=256),
    # GPT-2 (Radford et al. 2019): 124 M and 355 M parameters with its 50257-token BPE.
    "gpt2-small": LMSpec("transformer", 12, 768, 12, 1024, 50257),
    "gpt2-medium": LMSpec("transformer", 24, 1024, 16, 1024, 50257),
    # Zaremba et al. 2014 "medium" PTB model: 2 x 650 units, untied output, 10k words.
    "lstm": LMSpec("lstm", layers=2, width=650, heads=0, context=None, vocab_size=10000,
                   tied=False),
}

LM_MODEL_NAMES = tuple(sorted(PRESETS))


def lm_spec(name: str) -> LMSpec:
  if name not in PRESETS:
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(LM_MODEL_NAMES)}")
  return PRESETS[name]
