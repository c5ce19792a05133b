"""Convert an adapter folder in the compact layout (what runs write) into PEFT's layout, which plain
``peft.PeftModel.from_pretrained`` loads on a machine without this package.

    python scripts/convert_to_peft.py outputs/.../adapter adapter_peft
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from partial_lora.adapters.files import convert_to_peft  # noqa: E402
from partial_lora.errors import PartialLoraError  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="adapter folder (compact or PEFT's layout)")
    parser.add_argument("target", help="folder to write PEFT's layout to (may be the source)")
    arguments = parser.parse_args()
    try:
        written = convert_to_peft(arguments.source, arguments.target)
    except PartialLoraError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {written} in PEFT's layout ({written.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
