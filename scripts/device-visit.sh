#!/usr/bin/env bash
# One visit to the GPU machine: install from .carry, then run the named stages, logging to $OUT.
# Usage (device command): bash scripts/device-visit.sh COMMIT STAGE [STAGE ...]
# COMMIT: the literal hash, written here before the call. `$(git rev-parse HEAD)` in the device command is expanded
# there, in a copy whose git metadata may be stale (2026-12-01: it recorded 196b939 for a run of 4743331's tree).
set -uo pipefail
export COMMIT=$1 TRIACCEL_COMMIT=$1
shift
for packed in .carry/fashion-mnist/*.xz; do  # scripts/shrink-carry.sh sends the images as xz: gzip them back
  [[ -f $packed && ! -f ${packed%.xz}.gz ]] && xz -dc "$packed" | gzip -1 > "${packed%.xz}.gz"
done
source .carry/activate
rm -rf /tmp/pkg /tmp/src_moved  # a warm machine keeps the last visit's copies
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/pkg . >/dev/null 2>&1 || exit 3
export PYTHONPATH=/tmp/site:/tmp/pkg
mv triaccel_rl /tmp/src_moved  # the installed package, not the tree, must be imported
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    gputests) python3 -m pytest -q --tb=line -p no:cacheprovider tests/test_gpu_training.py tests/kernels/test_kernels_gpu.py tests/kernels/test_fused_optim.py tests/test_controller_rounds.py \
                tests/elastic/test_gpu_elastic.py tests/test_engine_fused.py tests/test_compile.py \
                tests/test_engine_param_groups.py tests/test_engine_scaler_and_lr_knobs.py tests/test_controller_close_pending.py \
                tests/test_fused_state_view.py tests/test_unheld_midrun.py tests/test_controller_dropped.py \
                tests/test_controller_fused_option.py tests/test_fused_map_set.py tests/test_midrun_messages.py tests/test_cuda_timing.py tests/test_bind_large_grads.py 2>&1 | tail -25 ;;
    # The estimator rounds in a user's loop (Controller(probe=...)): cost and effect, both GPU models, 2 seeds.
    user-rounds) python3 experiments/bench_user_rounds.py --seeds 2 --out "$OUT/bench_user_rounds.json" 2>&1 | tail -8 ;;
    # A run long enough for rounds to fit the overhead budget (the 4-epoch runs above refuse every one).
    user-rounds-long) python3 experiments/bench_user_rounds.py --models resnet18-fmnist --epochs 20 \
           --out "$OUT/bench_user_rounds_long.json" 2>&1 | tail -6 ;;
    signals) python3 experiments/bench_signals.py --output "$OUT/signals_overhead.json" 2>&1 | tail -25 ;;
    # The same through the product's StepEngine (fused step, bf16 weight copies, observe_layers).
    signals-cnn-engine) python3 experiments/bench_signals.py --engine --models cnn-fmnist --output "$OUT/signals_overhead.json" 2>&1 | tail -12 ;;
    signals-engine) python3 experiments/bench_signals.py --engine --output "$OUT/signals_overhead.json" 2>&1 | tail -25 ;;
    env) python3 experiments/bench_env.py --tasks cnn-fmnist --n-envs 1 --steps 12 --device cuda \
           --out "$OUT/env_throughput_gpu.json" 2>&1 | tail -8 ;;
    resnet-pilot) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 1 --static 256,1.0 \
           --rows plain-bf16,static-bf16,heuristic --out "$OUT/pilot.json" --plots "$OUT/plots" 2>&1 | tail -20 ;;
    profile) python3 scripts/profile_step.py 2>&1 | tail -80 ;;
    freed) python3 scripts/check_run_freed.py 2>&1 | tail -12 ;;
    oom-release) python3 scripts/check_oom_release.py 2>&1 | tail -40 ;;
    # The allocator xfail alone, in pytest as in gputests (the OOM test, then the release check).
    oom-tests) python3 -m pytest -q --tb=short -p no:cacheprovider tests/elastic/test_gpu_elastic.py 2>&1 | tail -15 ;;
    # Which earlier file leaves the reserve: the gputests order, then each file alone before the elastic file, the
    # allocator xfail run as a test (--runxfail) so that its report prints.
    oom-bisect) for f in "tests/test_gpu_training.py tests/kernels/test_kernels_gpu.py tests/kernels/test_fused_optim.py" \
                         tests/kernels/test_kernels_gpu.py tests/kernels/test_fused_optim.py tests/test_gpu_training.py; do
                  echo "--- $f"; python3 -m pytest -q --tb=short --runxfail -p no:cacheprovider $f tests/elastic/test_gpu_elastic.py \
                    2>&1 | tee -a "$OUT/oom_bisect.log" | grep -v "^\.\|^$" | tail -30
                done ;;
    # Issue 5's benchmark: the batch finder, a run at half its peak (budget use), a real OOM recovered.
    elastic) python3 experiments/bench_elastic.py --output "$OUT/elastic_batch.json" 2>&1 | tail -12 ;;
    memory-model) python3 scripts/check_memory_model.py 2>&1 | tail -40 ;;
    failed-capture) python3 scripts/check_failed_capture.py 2>&1 | tail -8 ;;
    copies) python3 scripts/check_weight_copies.py 2>&1 | tail -12 ;;
    # Re-checks of the controller's overhead (its parts are printed per run) on both models, 2 seeds each.
    overhead-resnet) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 2 --static 256,1.0,9.4 \
           --rows static-bf16,heuristic --out "$OUT/overhead_resnet.json" 2>&1 | tail -12 ;;
    overhead-effnet) python3 experiments/gpu_benchmark.py --models effnet-b0-fmnist --epochs 10 --seeds 2 --static 256,1.0 \
           --rows static-bf16,heuristic --out "$OUT/overhead_effnet.json" 2>&1 | tail -12 ;;
    # Issue 7 in three visits of under 10 minutes, at the tuned static setting of the widened grid (2026-12-02): batch 512,
    # the LR held (x0.5 on the linear LR), on both models. The other stages keep the old grid's batch 256, LR x1.
    i7-resnet-a) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 3 --static 512,0.5,5.1 \
           --rows plain-bf16,static-bf16,heuristic,heuristic-cheap,fp32 --out "$OUT/i7_resnet_a.json" \
           --plots "$OUT/plots_a" 2>&1 | tail -30 ;;
    i7-resnet-b) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 3 --static 512,0.5,5.1 \
           --rows static-fp16,ablation-precision,ablation-second-order,ablation-elastic,learned,batch-finder \
           --out "$OUT/i7_resnet_b.json" --plots "$OUT/plots_b" 2>&1 | tail -30 ;;
    i7-effnet) python3 experiments/gpu_benchmark.py --models effnet-b0-fmnist --epochs 10 --seeds 2 --static 512,0.5,7.9 \
           --rows plain-bf16,plain-fp32,fp32,static-bf16,static-fp16,heuristic --out "$OUT/i7_effnet.json" --plots "$OUT/plots_e" \
           2>&1 | tail -30 ;;
    # The same in two visits of well under 10 minutes: the executor's rows (fp32 among them, for the >= 5x target),
    # then the user's own loops.
    i7-effnet-a) python3 experiments/gpu_benchmark.py --models effnet-b0-fmnist --epochs 10 --seeds 2 --static 512,0.5,7.9 \
           --rows fp32,static-bf16,static-fp16,heuristic,heuristic-no-trial --out "$OUT/i7_effnet_a.json" \
           --plots "$OUT/plots_ea" 2>&1 | tail -30 ;;
    i7-effnet-b) python3 experiments/gpu_benchmark.py --models effnet-b0-fmnist --epochs 10 --seeds 2 --static 512,0.5,7.9 \
           --rows plain-bf16,plain-fp32 --out "$OUT/i7_effnet_b.json" --plots "$OUT/plots_eb" 2>&1 | tail -30 ;;
    # The speed trial and the one-sided cheap sensitivity, side by side with the static rows (about 6 minutes).
    speed-resnet) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 3 --static 256,1.0,9.4 \
           --rows static-bf16,static-fp16,heuristic,heuristic-no-trial --out "$OUT/speed_resnet.json" 2>&1 | tail -20 ;;
    speed-effnet) python3 experiments/gpu_benchmark.py --models effnet-b0-fmnist --epochs 10 --seeds 2 --static 256,1.0 \
           --rows static-bf16,static-fp16,heuristic,heuristic-no-trial --out "$OUT/speed_effnet.json" 2>&1 | tail -20 ;;
    # The heuristic that anneals on a late plateau, beside the best static row and the plain heuristic (about 5 minutes).
    anneal-resnet) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 3 --static 256,1.0,9.4 \
           --rows static-fp16,heuristic,heuristic-anneal --out "$OUT/anneal_resnet.json" 2>&1 | tail -20 ;;
    # Annealing early enough to matter (a 5% plateau, or a timed cut past 35%, decisions at most 2 intervals apart)
    # beside the best static row and that row on a two-thirds schedule (~5 min).
    anneal2-resnet) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 3 --static 512,0.5,5.4 \
           --rows static-fp16,static-fp16-8of12,heuristic-anneal5,heuristic-anneal-timed --out "$OUT/anneal2_resnet.json" \
           --plots "" 2>&1 | tail -24 ;;
    # Annealing with a decision every interval (1x), from 30% or 25% of the run, beside static fp16 and the 2x rule (~3 min),
    # and on EfficientNet-B0 (~2.5 min).
    anneal3-resnet) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 3 --static 512,0.5,5.4 \
           --rows static-fp16,heuristic-anneal5,heuristic-anneal5-i1,heuristic-anneal5-i1-a25 \
           --out "$OUT/anneal3_resnet.json" --plots "" 2>&1 | tail -20 ;;
    anneal3-effnet) python3 experiments/gpu_benchmark.py --models effnet-b0-fmnist --epochs 10 --seeds 2 --static 512,0.5,7.9 \
           --rows static-fp16,heuristic-anneal5,heuristic-anneal5-i1 --out "$OUT/anneal3_effnet.json" --plots "" 2>&1 | tail -20 ;;
    # The annealing rule's confirmation: 5 seeds on ResNet-18, 3 on EfficientNet-B0, beside static fp16 and the heuristic (~6 min).
    anneal-confirm) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 5 --static 512,0.5,5.4 \
           --rows static-fp16,heuristic,heuristic-anneal5-i1 --out "$OUT/anneal_confirm_resnet.json" --plots "" 2>&1 | tail -9
         python3 experiments/gpu_benchmark.py --models effnet-b0-fmnist --epochs 10 --seeds 3 --static 512,0.5,7.9 \
           --rows static-fp16,heuristic,heuristic-anneal5-i1 --out "$OUT/anneal_confirm_effnet.json" --plots "" 2>&1 | tail -9 ;;
    # Annealing two rungs at once, beside static fp16 (~4 min on both models).
    anneal-r2) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 3 --static 512,0.5,5.4 \
           --rows static-fp16,heuristic-anneal5-i1-r2 --out "$OUT/anneal_r2_resnet.json" --plots "" 2>&1 | tail -6
         python3 experiments/gpu_benchmark.py --models effnet-b0-fmnist --epochs 10 --seeds 2 --static 512,0.5,7.9 \
           --rows static-fp16,heuristic-anneal5-i1-r2 --out "$OUT/anneal_r2_effnet.json" --plots "" 2>&1 | tail -6 ;;
    # Not yet run: the 5% rule beside a looser one from 25% of the run, evaluated every 50 steps (half the quantisation
    # of time to target), 5 seeds on ResNet-18 (~5 min) and 3 on EfficientNet-B0 (~5 min), one stage a visit.
    anneal-next-resnet) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 5 --static 512,0.5,5.4 \
           --eval-steps 50 --rows static-fp16,heuristic-anneal5-i1,heuristic-anneal8-i1-a25 \
           --out "$OUT/anneal_next_resnet.json" --plots "" 2>&1 | tail -8 ;;
    anneal-next-effnet) python3 experiments/gpu_benchmark.py --models effnet-b0-fmnist --epochs 10 --seeds 3 \
           --static 512,0.5,7.9 --eval-steps 50 --rows static-fp16,heuristic-anneal5-i1,heuristic-anneal8-i1-a25 \
           --out "$OUT/anneal_next_effnet.json" --plots "" 2>&1 | tail -8 ;;
    # Annealing past x0.5 (to x0.25), from 30% on a 5% plateau or from 25% on an 8% one, beside static fp16 and the 5% rule,
    # evaluated every 50 steps: 5 seeds on ResNet-18 (5.5 min), 3 on EfficientNet-B0 (4 rows, ~5 min), one stage a visit.
    anneal-deep-resnet) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 5 --static 512,0.5,5.4 \
           --eval-steps 50 --rows static-fp16,heuristic-anneal5-i1,heuristic-anneal8-i1-a25,heuristic-anneal5-i1-deep,heuristic-anneal8-i1-a25-deep \
           --out "$OUT/anneal_deep_resnet.json" --plots "" 2>&1 | tail -9 ;;
    anneal-deep-effnet) python3 experiments/gpu_benchmark.py --models effnet-b0-fmnist --epochs 10 --seeds 3 \
           --static 512,0.5,7.9 --eval-steps 50 \
           --rows static-fp16,heuristic-anneal5-i1,heuristic-anneal5-i1-deep,heuristic-anneal8-i1-a25-deep \
           --out "$OUT/anneal_deep_effnet.json" --plots "" 2>&1 | tail -9 ;;
    # The deep annealing row's replicate on ResNet-18, beside static fp16 and the default heuristic, 5 seeds (~4 min).
    anneal-deep-confirm) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 5 --static 512,0.5,5.4 \
           --eval-steps 50 --rows static-fp16,heuristic,heuristic-anneal5-i1-deep \
           --out "$OUT/anneal_deep_confirm_resnet.json" --plots "" 2>&1 | tail -7 ;;
    # The deep annealing row beside itself with fp16 pinned (no speed trial), static fp16 and static bf16, 5 seeds (~5 min).
    anneal-pinned-resnet) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 5 --static 512,0.5,5.4 \
           --eval-steps 50 --rows static-fp16,static-bf16,heuristic-anneal5-i1-deep,heuristic-anneal5-i1-deep-fp16 \
           --out "$OUT/anneal_pinned_resnet.json" --plots "" 2>&1 | tail -8 ;;
    # Not yet run: where the annealed rows' overhead goes now that the optimizer's moments are timed apart from the
    # rollback copy (overhead part `moments`, since 9a503ef), 2 seeds beside static fp16 (~2 min). With gputests, the
    # first visit after the sixth session (the GPU checkpoint test has not run yet).
    overhead-parts-resnet) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 2 --static 512,0.5,5.4 \
           --rows static-fp16,heuristic-anneal5-i1 --out "$OUT/overhead_parts_resnet.json" --plots "" 2>&1 | tail -16 ;;
    # The rollback copy's pinned memory allocated before training (RollbackGuard.reserve, since the seventh session):
    # the annealed rows and the default heuristic beside static fp16, 5 seeds, evaluated every 50 steps (~6 min).
    reserve-resnet) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 5 --static 512,0.5,5.4 \
           --eval-steps 50 --rows static-fp16,heuristic,heuristic-anneal5-i1,heuristic-anneal5-i1-deep \
           --out "$OUT/reserve_resnet.json" --plots "" 2>&1 | tail -8 ;;
    # Deep annealing from 1.5x and 2x the static grid's best LR, beside static fp16 at 1x and 1.5x, 5 seeds (~6 min).
    anneal-lr-resnet) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 5 --static 512,0.5,5.4 \
           --eval-steps 50 --rows static-fp16,static-fp16-lr1.5,heuristic-anneal5-i1-deep,heuristic-anneal5-i1-deep-lr1.5,heuristic-anneal5-i1-deep-lr2 \
           --out "$OUT/anneal_lr_resnet.json" --plots "$OUT/plots_anneal_lr" 2>&1 | tail -9 ;;
    # Is the speed trial behind the collapses at 1.5x? The row again, beside itself with fp16 pinned, 5 seeds (~2.5 min).
    trial-lr-resnet) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 5 --static 512,0.5,5.4 \
           --eval-steps 50 --rows heuristic-anneal5-i1-deep-lr1.5,heuristic-anneal5-i1-deep-fp16-lr1.5 \
           --out "$OUT/trial_lr_resnet.json" --plots "$OUT/plots_trial_lr" 2>&1 | tail -6 ;;
    # Not yet run: can clipping the gradient norm keep the x1.5 annealed row from collapsing near the peak LR?
    # Beside static fp16 (with and without the clip) and the unclipped row, 5 seeds (~7 min). With gputests first.
    clip-lr-resnet) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 5 --static 512,0.5,5.4 \
           --eval-steps 50 --rows static-fp16,static-fp16-clip3,heuristic-anneal5-i1-deep-fp16-lr1.5,heuristic-anneal5-i1-deep-fp16-lr1.5-clip1,heuristic-anneal5-i1-deep-fp16-lr1.5-clip3 \
           --out "$OUT/clip_lr_resnet.json" --plots "$OUT/plots_clip_lr" 2>&1 | tail -9 ;;
    # The clipped deep row at x1, x1.5 and x2 of the grid's LR beside the clipped static rows at x1 and x1.5 (~6 min).
    clip-lr2-resnet) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 5 --static 512,0.5,5.4 \
           --eval-steps 50 --rows static-fp16-clip3,static-fp16-lr1.5-clip3,heuristic-anneal5-i1-deep-fp16-clip3,heuristic-anneal5-i1-deep-fp16-lr1.5-clip3,heuristic-anneal5-i1-deep-fp16-lr2-clip3 \
           --out "$OUT/clip_lr2_resnet.json" --plots "$OUT/plots_clip_lr2" 2>&1 | tail -9 ;;
    # The fused step, uniform weight decay and the usual no-decay-on-1-dim-parameters recipe, beside stock PyTorch (~2 min).
    fused-decay) python3 experiments/bench_fused_step.py --output "$OUT/fused_step.json" 2>&1 | tail -14
           python3 experiments/bench_fused_step.py --decay-groups --output "$OUT/fused_step_decay_groups.json" 2>&1 | tail -14 ;;
    # A careful user's shorter schedule (8 and 10 of 12 epochs), clipped, beside the clipped deep row and static fp16 (~5 min).
    short-clip-resnet) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 5 --static 512,0.5,5.4 \
           --eval-steps 50 --rows static-fp16-clip3,static-fp16-8of12-clip3,static-fp16-10of12-clip3,heuristic-anneal5-i1-deep-fp16-clip3 \
           --out "$OUT/short_clip_resnet.json" --plots "" 2>&1 | tail -8 ;;
    # EfficientNet-B0's best static row on shorter schedules: is its time to target set by the schedule, as ResNet-18's?
    short-effnet) python3 experiments/gpu_benchmark.py --models effnet-b0-fmnist --epochs 10 --seeds 3 --static 512,0.5,7.9 \
           --eval-steps 50 --rows static-fp16,static-fp16-10of12,static-fp16-8of12 \
           --out "$OUT/short_effnet.json" --plots "" 2>&1 | tail -8 ;;
    # The clipped deep row with its cuts released at 60% or 75% of the run (a warm restart for the final accuracy),
    # beside it and both static fp16 rows, 5 seeds (~6.5 min).
    release-resnet) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 5 --static 512,0.5,5.4 \
           --eval-steps 50 --rows static-fp16,static-fp16-clip3,heuristic-anneal5-i1-deep-fp16-clip3,heuristic-anneal5-i1-deep-fp16-clip3-rel60,heuristic-anneal5-i1-deep-fp16-clip3-rel75 \
           --out "$OUT/release_resnet.json" --plots "$OUT/plots_release" 2>&1 | tail -9 ;;
    # The best annealing row beside static fp16 with and without the clip, 5 seeds (~6 min): its accuracy gap today.
    anneal-resnet-5) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 5 --static 512,0.5,5.4 \
           --eval-steps 50 --rows static-fp16,static-fp16-clip3,heuristic-anneal5-i1-deep-fp16-clip3 \
           --out "$OUT/anneal_resnet_5.json" --plots "$OUT/plots_anneal5" 2>&1 | tail -6 ;;
    # The clipped deep row with its first cut a doubled batch (LR held, anneal_by="batch") beside the LR-cut row and
    # static fp16 clipped, 5 seeds (~6 min).
    anneal-batch-resnet) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 5 --static 512,0.5,5.4 \
           --eval-steps 50 --rows static-fp16-clip3,heuristic-anneal5-i1-deep-fp16-clip3,heuristic-anneal5-i1-deepbatch-fp16-clip3 \
           --out "$OUT/anneal_batch_resnet.json" --plots "$OUT/plots_anneal_batch" 2>&1 | tail -7 ;;
    # One seed of static fp16 and the clipped deep row: the training pipeline end to end after engine changes (~1.5 min).
    smoke-resnet) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 1 --static 512,0.5,5.4 \
           --eval-steps 50 --rows static-fp16,heuristic-anneal5-i1-deep-fp16-clip3 \
           --out "$OUT/smoke_resnet.json" --plots "" 2>&1 | tail -5 ;;
    # The late batch ramp (LR held, or linear), beside the best static row, the heuristic and two controls (~6 min).
    ramp-resnet) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 3 --static 256,1.0,6.9 \
           --rows static-fp16,heuristic,heuristic-ramp,heuristic-ramp-linear,static-fp16-lr0.5,static-fp16-b2x \
           --out "$OUT/ramp_resnet.json" --plots "$OUT/plots_ramp_resnet" 2>&1 | tail -24 ;;
    ramp-effnet) python3 experiments/gpu_benchmark.py --models effnet-b0-fmnist --epochs 10 --seeds 2 --static 256,1.0,9.3 \
           --rows static-fp16,heuristic,heuristic-ramp,heuristic-ramp-linear --out "$OUT/ramp_effnet.json" \
           --plots "$OUT/plots_ramp_effnet" 2>&1 | tail -20 ;;
    # The ramp from the widened grid's best static setting (batch 512, the LR held), beside that row (~2.5 min).
    ramp512-resnet) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 3 --static 512,0.5,5.5 \
           --rows static-fp16,heuristic-ramp --out "$OUT/ramp512_resnet.json" --plots "" 2>&1 | tail -12 ;;
    # The learned policy (with its speed trial since 0f99439) beside the heuristic and the best static row (~6 min both).
    learned-resnet) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 3 --static 512,0.5,5.1 \
           --rows static-fp16,heuristic,learned --out "$OUT/learned_resnet.json" 2>&1 | tail -30 ;;
    learned-effnet) python3 experiments/gpu_benchmark.py --models effnet-b0-fmnist --epochs 10 --seeds 2 --static 512,0.5,7.9 \
           --rows static-fp16,heuristic,learned --out "$OUT/learned_effnet.json" 2>&1 | tail -30 ;;
    # An early batch ramp (one doubling at 25% or 35% of the run, the LR held), the user's fp16 + GradScaler loop, and
    # the tuned row at half its LR (the grid's best LR is at its edge), beside static fp16 (~5 min).
    ramp-early-resnet) python3 experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 3 --static 512,0.5,5.0 \
           --rows plain-fp16,static-fp16,static-fp16-lr0.5,heuristic-ramp25,heuristic-ramp35 \
           --out "$OUT/ramp_early_resnet.json" --plots "" 2>&1 | tail -30 ;;
    ramp-early-effnet) python3 experiments/gpu_benchmark.py --models effnet-b0-fmnist --epochs 10 --seeds 2 \
           --static 512,0.5,7.9 --rows plain-fp16,static-fp16,static-fp16-lr0.5,heuristic-ramp25,heuristic-ramp35 \
           --out "$OUT/ramp_early_effnet.json" --plots "" 2>&1 | tail -30 ;;
    # A user's torch.compile'd loop with and without the Controller, side by side (ResNet-18 ~5 min, EfficientNet-B0 ~6).
    compile-resnet) python3 experiments/bench_compile.py --models resnet18-fmnist --out "$OUT/bench_compile_resnet.json" 2>&1 | tail -12 ;;
    compile-effnet) python3 experiments/bench_compile.py --models effnet-b0-fmnist --out "$OUT/bench_compile_effnet.json" 2>&1 | tail -12 ;;
    # reduce-overhead (cudagraph trees) beside eager and the default mode, plain and controlled (~4 min a model).
    ro-resnet) python3 experiments/bench_compile.py --models resnet18-fmnist --out "$OUT/bench_compile_ro_resnet.json" \
           --rows plain-eager,plain-compiled,plain-compiled-ro,controller-eager,controller-compiled-ro,heuristic-compiled-ro 2>&1 | tail -12 ;;
    ro-effnet) python3 experiments/bench_compile.py --models effnet-b0-fmnist --out "$OUT/bench_compile_ro_effnet.json" \
           --rows plain-eager,plain-compiled,plain-compiled-ro,controller-eager,controller-compiled-ro,heuristic-compiled-ro 2>&1 | tail -12 ;;
    # Where a user's loop under the Controller spends its time against a plain loop (~2 min).
    profile-loop) python3 scripts/profile_user_loop.py --out "$OUT/profile_user_loop.json" 2>&1 | tail -80 ;;
    # The same in fp16 at batch 256 (the Controller's eager cost the forty-third session's profile put at 16.7 ms a
    # step against 9.1 for the plain loop, a mean over steps with decisions in it).
    profile-loop-fp16) python3 scripts/profile_user_loop.py --precision fp16 --batch 256 \
           --out "$OUT/profile_user_loop_fp16.json" 2>&1 | tail -80 ;;
    # A user's eager fp16 loop, plain and under the Controller, both models, rows in turns (~3 min): the forty-second
    # session's check, rerun to compare a commit's ratios with f3dc088's (1.10 EfficientNet-B0, 1.19 ResNet-18).
    eager-fp16) python3 experiments/bench_compile.py --models effnet-b0-fmnist,resnet18-fmnist \
           --rows plain-eager,controller-eager --batch-size 256 --precision fp16 \
           --out "$OUT/bench_eager_fp16.json" 2>&1 | tail -12 ;;
    # Autograd adding into flat-buffer views against fresh gradients copied after the backward (~1 min).
    grad-binding) python3 scripts/check_grad_binding_cost.py --out "$OUT/grad_binding_cost.json" 2>&1 | tail -12 ;;
    # The large parameters' gradients bound before the backward against none: step time and peak memory (~2 min).
    large-binding) python3 scripts/check_large_grad_binding.py --out "$OUT/large_grad_binding.json" 2>&1 | tail -12 ;;
    # Can a run tell from its first intervals that its LR is off? The lookahead signal on the GPU models.
    lookahead) for m in resnet18-fmnist effnet-b0-fmnist; do
        python3 experiments/lr_lookahead_probe.py --device cuda --tasks $m --factors 0.125,0.25,0.5,1 --seeds 2 \
          --share 0.5 --interval-steps 20 --batch-size 512 --out "$OUT/lr_lookahead_$m.json" 2>&1 | tail -4; done ;;
    mixed-speed) python3 scripts/check_mixed_precision_speed.py --out "$OUT/mixed_precision_speed.json" 2>&1 | tail -20 ;;
    set-to-none) python3 scripts/check_set_to_none_cost.py --out "$OUT/set_to_none_cost.json" 2>&1 | tail -6 ;;
    # Where static fp16's and the heuristic's extra peak memory over static bf16 comes from (~1.5 min).
    memory) python3 scripts/check_memory_formats.py --out "$OUT/memory_formats.json" 2>&1 | tail -30 ;;
    # The Controller's estimator-round tests and the GPU training tests alone: a short visit after a rounds change.
    rounds-tests) python3 -m pytest -q --tb=line -p no:cacheprovider tests/test_controller_rounds.py \
                    tests/test_gpu_training.py 2>&1 | tail -8 ;;
    # The Controller under DDP, checked and timed against a plain DDP loop: NCCL on two GPUs, gloo on one (shared).
    ddp) python3 -m torch.distributed.run --nproc_per_node 2 scripts/check_ddp_gpu.py --out "$OUT/ddp_gpu.json" 2>&1 \
           | grep -v "^W\|warn" | tail -45 ;;
    # An ad-hoc check (a reviewer's repro, say) against the installed package: py=path/to/script.py
    py=*) python3 "${stage#py=}" 2>&1 | tail -40 ;;
    # Any other stage is gpu_benchmark.py's arguments, parsed as a shell would (eval: so `--plots ''` stays an empty
    # argument; unquoted word splitting dropped it, 2026-12-02, and the job died on "--plots: expected one argument").
    *) eval "python3 experiments/gpu_benchmark.py $stage" 2>&1 | tail -40 ;;
  esac
done
echo "=== done $(date +%T)"
