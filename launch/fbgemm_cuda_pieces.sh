#!/usr/bin/env bash
# FBGEMM's CUDA wheel (fbgemm-gpu 1.6.0, cp312, links libcudart.so.13: the GPU machine's torch 2.11 + CUDA 13)
# is 465 MB; a device call carries at most 64 MiB. It travels in <= 60 MiB pieces, one per call, into the
# ignored folder .fbgemm_pieces/ that the warm machine keeps between calls, then is reassembled there.
#
#   Here:   bash launch/fbgemm_cuda_pieces.sh split           # download (once) and cut into .fbgemm_pieces/
#           then one device call per piece, carry [".fbgemm_pieces/part_NN"], command "ls .fbgemm_pieces"
#   There:  bash launch/fbgemm_cuda_pieces.sh assemble        # check every piece, join, verify sha256, install
#           (installs into /tmp/robe_fbgemm_cuda; put it first on PYTHONPATH, before the carried CPU build)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WHEEL=fbgemm_gpu-1.6.0-cp312-cp312-manylinux_2_28_x86_64.whl
SHA256=603ec98ebb234b485e69502ded37a4059157342f061891bee6a8e3d4d325225c
DIR=.fbgemm_pieces
PIECE_MIB=60

case "${1:-}" in
  split)
    mkdir -p "$DIR"
    if [ ! -f "$DIR/$WHEEL" ]; then
      python3 -m pip download fbgemm-gpu==1.6.0 --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_28_x86_64 -d "$DIR"
    fi
    echo "$SHA256  $DIR/$WHEEL" | sha256sum -c -
    rm -f "$DIR"/part_*
    split -b "${PIECE_MIB}M" -d -a 2 "$DIR/$WHEEL" "$DIR/part_"
    (cd "$DIR" && sha256sum part_* > pieces.sha256)
    ls -l "$DIR"/part_* | awk '{print $5, $9}'
    echo "carry each $DIR/part_NN in its own call (and $DIR/pieces.sha256 in the first)"
    ;;
  assemble)
    [ -f "$DIR/pieces.sha256" ] || { echo "missing $DIR/pieces.sha256: carry it with the first piece"; exit 1; }
    (cd "$DIR" && sha256sum -c pieces.sha256) || { echo "a piece is missing or damaged: carry it again"; exit 1; }
    cat "$DIR"/part_* > "/tmp/$WHEEL"
    echo "$SHA256  /tmp/$WHEEL" | sha256sum -c -
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/robe_fbgemm_cuda "/tmp/$WHEEL"
    PYTHONPATH="/tmp/robe_fbgemm_cuda${PYTHONPATH:+:$PYTHONPATH}" python3 -c \
      "import torch, fbgemm_gpu; print('fbgemm_gpu CUDA loaded:', torch.ops.fbgemm.asynchronous_complete_cumsum(torch.tensor([1, 2], device='cuda')))"
    ;;
  *)
    echo "usage: $0 split|assemble"; exit 2 ;;
esac
