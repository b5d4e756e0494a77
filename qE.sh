#!/bin/bash
cd /work/i10
while pgrep -f "evalck.py 300 pbn /work/runs/d32s0" >/dev/null; do sleep 5; done
OMP_NUM_THREADS=1 /work/venv/bin/python evalck.py 300 pbn /work/runs/d32s2/part2.pt /work/runs/d32s3/part2.pt >> eval300.jsonl
