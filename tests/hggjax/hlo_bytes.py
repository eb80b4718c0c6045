"""Bytes per device of the collectives in compiled HLO text, read from their shapes."""

import re

_ITEMSIZE = {"s32": 4, "u32": 4, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "f64": 8, "pred": 1}
_OP = re.compile(r"= (.*?) (all-gather|all-to-all|all-reduce)(?:-start)?\((.*)$")
_SHAPE = re.compile(r"\b(\w+)\[([\d,]*)\]")


def _bytes(text: str) -> int:
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    size = 1
    for d in filter(None, dims.split(",")):
      size *= int(d)
    total += size * _ITEMSIZE[dtype]
  return total


def _group_size(attrs: str) -> int:
  listed = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
  if listed:
    return len(listed.group(1).split(","))
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", attrs)  # [groups, size]<=[...]
  return int(iota.group(2))


def collectives(hlo: str) -> list[dict]:
  """Every all-gather, all-to-all and all-reduce: its kind, group size G and result bytes."""
  out = []
  for line in hlo.splitlines():
    m = _OP.search(line)
    if m and "-done" not in line:
      out.append({"kind": m.group(2), "group": _group_size(m.group(3)),
                  "bytes": _bytes(m.group(1))})
  return out


def sent_and_received(hlo: str, kinds=("all-gather", "all-to-all")) -> tuple[float, float]:
  """(own data put on the wire, other devices' data arriving) per device.

  An all-gather's result holds G blocks: one is this device's (sent once), G - 1
  arrive. An all-to-all's G blocks: G - 1 leave, G - 1 arrive.
  """
  sent = received = 0.0
  for c in collectives(hlo):
    if c["kind"] not in kinds:
      continue
    block = c["bytes"] / c["group"]
    sent += block if c["kind"] == "all-gather" else (c["group"] - 1) * block
    received += (c["group"] - 1) * block
  return sent, received
