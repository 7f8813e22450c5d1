#!/usr/bin/env python3
"""PEFT's own default for every config field of the methods of the golden adapters.

A field petal leaves out of an adapter_config.json takes PEFT's default when PEFT loads the
file; a test checks that each field petal leaves out of a golden adapter saved again held that
default in PEFT's file. The defaults are the config dataclasses' own (`dataclasses.fields`:
`default`, or `default_factory()`), for each `peft_type` among
tests/fixtures/golden/adapters/*/adapter_config.json.

    target/venv-ref/bin/python tools/golden/make_peft_defaults.py

Writes tests/fixtures/golden/peft_defaults.json: {peft_type: {field: default}} (an enum as its
value, a nested config dataclass as its dict).
Versions: tools/golden/requirements.txt (peft 0.21.2).
"""
import dataclasses
import enum
import json
import pathlib

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

GOLDEN = pathlib.Path(__file__).resolve().parents[2] / "tests/fixtures/golden"


def plain(v):
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, (set, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if dataclasses.is_dataclass(v):
        return plain(dataclasses.asdict(v))
    return v


def main():
    types = sorted({json.loads(p.read_text())["peft_type"]
                    for p in (GOLDEN / "adapters").glob("*/adapter_config.json")})
    out = {}
    for t in types:
        cls = PEFT_TYPE_TO_CONFIG_MAPPING[t]
        d = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                d[f.name] = plain(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                d[f.name] = plain(f.default_factory())
        out[t] = d
    (GOLDEN / "peft_defaults.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(", ".join(f"{t}: {len(d)} fields" for t, d in out.items()))


if __name__ == "__main__":
    main()
