#!/bin/bash
# `make test` twice in a row while `make bench` loops beside it (issue 21's check that the
# suite holds on a loaded machine). Usage: scripts/loaded-run.sh [REV]; logs in /tmp/loadA.log
# (bench loop) and /tmp/loadB.{1,2}.log (the two test runs). Each run takes ~30-40 minutes.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
REV=${1:-HEAD}
rm -rf /tmp/loadA /tmp/loadB /tmp/load.stop
git clone -q "$REPO" /tmp/loadA && git -C /tmp/loadA checkout -q "$REV"
git clone -q "$REPO" /tmp/loadB && git -C /tmp/loadB checkout -q "$REV"
(
  cd /tmp/loadA; i=0
  while [ ! -e /tmp/load.stop ]; do
    i=$((i + 1)); echo "=== bench $i $(date)" >> /tmp/loadA.log
    make bench >> /tmp/loadA.log 2>&1; echo "=== bench $i rc=$? $(date)" >> /tmp/loadA.log
  done
) &
sleep 120  # the bench's floors first, then the suite beside its sandboxes
cd /tmp/loadB
for n in 1 2; do
  echo "=== test $n $(date)" > /tmp/loadB.$n.log
  make test >> /tmp/loadB.$n.log 2>&1; echo "=== test $n rc=$? $(date)" >> /tmp/loadB.$n.log
done
touch /tmp/load.stop
wait
