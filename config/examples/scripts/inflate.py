#!/usr/bin/env python3
"""Raises each product's price by 10%: an example of Hopper's `exec` processor protocol.

stdin:  the chunk's items, one JSON object per line.
env:    HOPPER_JOB, HOPPER_RUN, HOPPER_SEQ, HOPPER_ATTEMPT, HOPPER_FIRST_LINE.
stdout: one line {"index": N, "reason": "..."} per item refused as bad data (N counts from 0).
exit:   0 when the chunk is done; anything else and the chunk is retried later.

The output file is named after the chunk (run and seq) and replaced atomically, so a chunk
delivered twice does not write its products twice.
"""
import json
import os
import sys

run, seq = os.environ["HOPPER_RUN"], os.environ["HOPPER_SEQ"]
out_dir = os.path.join("data", "prices", run)
os.makedirs(out_dir, exist_ok=True)
tmp = os.path.join(out_dir, f".{seq}.tmp")
with open(tmp, "w") as out:
    for index, line in enumerate(sys.stdin):
        product = json.loads(line)
        price = product.get("price")
        if not isinstance(price, (int, float)):
            print(json.dumps({"index": index, "reason": f"product {product.get('id')}: no price"}))
            continue
        product["price"] = round(price * 1.1, 2)
        out.write(json.dumps(product) + "\n")
    out.flush()
    os.fsync(out.fileno())
os.replace(tmp, os.path.join(out_dir, f"{seq}.jsonl"))
