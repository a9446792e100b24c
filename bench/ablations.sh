#!/usr/bin/env bash
# The README's ablation tables: every variant and baseline on each public dataset in
# ../shared/datasets that has enough sessions (raw files converted with `sdm convert`).
# Usage: bash bench/ablations.sh [dataset ...]   (default: all below)
set -euo pipefail
cd "$(dirname "$0")/.."
S=${SDM_SHARED:-../shared}/datasets
run() { python bench/ablation.py --dataset "$@" -q; }
[ $# -gt 0 ] || set -- movielens_100k yoochoose diginetica rees46
for name in "$@"; do
  case $name in
    movielens_100k) run movielens_100k --convert movielens "$S/movielens_100k/raw" --config data/movielens.toml ;;
    yoochoose) run yoochoose --convert yoochoose "$S/yoochoose_rsc15_100k/raw/yoochoose-clicks-100k_train_full.txt" \
                 "$S/yoochoose_rsc15_100k/raw/yoochoose-clicks-100k_test.txt" --config data/yoochoose.toml ;;
    diginetica) run diginetica --convert diginetica "$S/diginetica/raw/sample_train-item-views.csv" \
                 "$S/diginetica/raw/product-categories.csv" --config data/diginetica.toml ;;
    rees46) run rees46 --convert rees46 "$S/rees46_ecommerce_sample/raw" --config data/rees46.toml ;;
    *) echo "unknown dataset $name" >&2; exit 2 ;;
  esac
done
