#!/bin/sh
# Installs labkit into /opt/labkit/venv inside an image; the one install step both recipes run
# (container/Dockerfile and container/labkit.def), from a copy of the repository at /opt/labkit/src.
#   VARIANT=cpu   torch's CPU wheel (from the PyTorch CPU index)
#   VARIANT=cuda  torch's CUDA wheel from PyPI (it brings the CUDA libraries as pip packages; the node's
#                 NVIDIA driver comes in at run time: apptainer exec --nv, or the NVIDIA container toolkit)
#   TORCH_INDEX   overrides the index torch comes from (e.g. an older CUDA build for an older driver)
# Versions: constraints.txt (torch) and pyproject.toml (everything else), never pinned here.
set -eu
VARIANT="${VARIANT:-cpu}"
SRC=/opt/labkit/src
VENV=/opt/labkit/venv
case "$VARIANT" in
    cpu)  index="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" ;;
    cuda) index="${TORCH_INDEX:-https://pypi.org/simple}" ;;
    *)    echo "install.sh: VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 2 ;;
esac
python3 -m venv "$VENV"
"$VENV/bin/pip" install --no-cache-dir --upgrade pip
"$VENV/bin/pip" install --no-cache-dir -c "$SRC/constraints.txt" --index-url "$index" torch
"$VENV/bin/pip" install --no-cache-dir -c "$SRC/constraints.txt" "$SRC"
# build-time check: labkit imports, the cluster layer loads, and the packaged MiniLM embeds offline
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$VENV/bin/python" -c "
import labkit.cluster, dask_jobqueue, jupyterlab
from labkit.pretrained import embed
assert embed(['a container check']).shape[-1] == 384
print('labkit image check: ok')"
mkdir -p /opt/labkit/notebooks && cp "$SRC"/notebooks/*.ipynb /opt/labkit/notebooks/
chmod -R a+rX /opt/labkit
