"""A user's own image folder to try the README's "your own images" walk-through on: N JPEGs from
`sample:mnist-m`'s training split (the same first images of each class on every machine), upscaled
to `--size` px as a camera's or a crawl's images would be larger than the preset's canvas, in one
subfolder per class.

    python -m benchmarks.usability.own_images --out mine --images 200 --size 64
"""

from __future__ import annotations

import argparse
import io
import os

from PIL import Image

from pipelines.images.samples import CLASS_NAMES, sample_tables


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write (must not exist)")
    parser.add_argument("--images", type=int, default=200, help="how many, spread evenly over the 10 classes")
    parser.add_argument("--size", type=int, default=64, help="side of each JPEG, px")
    args = parser.parse_args(argv)
    if os.path.exists(args.out):
        parser.error(f"--out {args.out}: exists; name a new folder")
    table = sample_tables("mnist-m")["train"].to_pydict()
    per_class, written = args.images // len(CLASS_NAMES), {name: 0 for name in CLASS_NAMES}
    for image, label, record in zip(table["image"], table["label"], table["id"]):
        name = CLASS_NAMES[label]
        if written[name] == per_class:
            continue
        os.makedirs(os.path.join(args.out, name), exist_ok=True)
        picture = Image.open(io.BytesIO(image)).convert("RGB").resize((args.size, args.size), Image.Resampling.BICUBIC)
        picture.save(os.path.join(args.out, name, f"{record.split('/')[-1]}.jpg"), quality=90)
        written[name] += 1
    print(f"{sum(written.values())} JPEGs of {args.size} px in {len(written)} class folders under {args.out}")


if __name__ == "__main__":
    main()
