# Device call 3 of perf21 (nvidia-h200-x2, the same warm machine as call 2), as sent (one line, split here):
# Ulysses sp2 before/after with torch varlen forced, interleaved. .devrun/perf21/p3/tree held this
# branch's changed files; ulysses_before.py was minirl/ulysses.py at b0e1949 (four all-to-alls per layer).
W=.devrun/perf21/p3; cp -r $W/tree/. .; cp minirl/ulysses.py /tmp/uf.py; export PYTHONUNBUFFERED=1 MINIRL_ATTN=varlen
r(){ timeout 100 python3 -m torch.distributed.run --standalone --nproc-per-node $2 bench/train_step.py --attn varlen \
       --sp $2 --tokens $3 --out $OUT/$1.json > $OUT/$1.log 2>&1; }
r v_sp1 1 16384; r v_sp2_fused 2 32768
cp $W/ulysses_before.py minirl/ulysses.py; r v_sp2_before 2 32768
cp /tmp/uf.py minirl/ulysses.py; r v_sp2_fused2 2 32768
cp $W/ulysses_before.py minirl/ulysses.py; r v_sp2_before2 2 32768
cd $OUT && tar czf v_all.tgz v_*.json v_*.log && rm v_*.json v_*.log
