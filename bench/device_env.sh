# Sourced by the GPU check scripts on the lent GPU machine: installs the carried wheels (.whl/, filled by
# ../shared/device/fetch-wheels.sh) into /tmp/site and puts them and this checkout on PYTHONPATH.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  echo "note: no .whl/ here; using the installed packages as they are" >&2
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
