#!/usr/bin/env bash
# ossie's ARM64 kernels under emulation, with no ARM hardware: cross-compiles csrc/tests/kernels_test.c with the
# kernels, runs it under qemu-aarch64 for CPU models with and without each extension, and prints one line per model
# and path (its checks: each path against the scalar path bit for bit, tokens together against each alone). Exits
# non-zero on any mismatch, or when a model does not show the paths it should. Installs nothing: on Debian,
#   apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
# Speed cannot be measured this way (docs/design.md says what the kernels should reach on real ARM CPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
CC=${CC:-aarch64-linux-gnu-gcc}
QEMU=${QEMU:-qemu-aarch64}
SYSROOT=${SYSROOT:-/usr/aarch64-linux-gnu}
for tool in "$CC" "$QEMU"; do
    command -v "$tool" >/dev/null || {
        echo "qemu.sh: $tool not found (Debian: apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user)" >&2
        exit 2
    }
done
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$CC" -O2 -std=gnu11 -ffp-contract=off -Wall -Werror -o "$out/kernels_test" \
    tests/kernels_test.c kernels.c pool.c x86_avx2.c x86_avx2_attention.c x86_avx512.c x86_q8_prompts.c neon.c neon_attention.c prompt_attention.c -lpthread -lm

status=0
# model: the paths it must show. cortex-a53: ARMv8.0, NEON only; cortex-a76: ARMv8.2 with dotprod; max: every
# extension qemu emulates (dotprod, i8mm, bf16: ossie uses dotprod and i8mm)
for model in "cortex-a53:neon" "cortex-a76:neon dotprod" "max:neon dotprod i8mm"; do
    cpu=${model%%:*} expected=${model#*:}
    if ! "$QEMU" -L "$SYSROOT" -cpu "$cpu" "$out/kernels_test" > "$out/$cpu.log"; then status=1; fi
    found=$(sed -n '1s/^paths: \(.*\) (and scalar)$/\1/p' "$out/$cpu.log")
    if [ "$found" != "$expected" ]; then
        echo "$cpu: paths found: '$found', expected '$expected'"
        status=1
    fi
    awk -v cpu="$cpu" '$NF == "ok" || $NF == "MISMATCH" { n[$1]++; if ($NF == "MISMATCH") bad[$1]++ }
        END { for (p in n) printf "%-11s %-8s %3d checks, %d mismatches\n", cpu, p, n[p], bad[p] }' "$out/$cpu.log" | sort
    grep MISMATCH "$out/$cpu.log" | sed "s/^/$cpu: /" || true
done
[ $status -eq 0 ] && echo "qemu.sh: every ARM64 path matches the scalar path" || echo "qemu.sh: FAILED"
exit $status
