"""bench.py: the benchmark takes as many training steps as it divides its time by."""
import bench

TINY = ["--img-size", "8", "--num-channels", "8", "--channel-multiples", "1", "--has-attn", "t",
        "--timesteps", "10", "--beta-max", "0.5"]


def test_the_benchmark_takes_as_many_training_steps_as_it_times(tmp_path):
    # 32 demo images are 8 batches of 4: 11 steps take a second epoch.
    b, _ = bench.parse(["--device", "cpu", "--batch-size", "4"])
    prog = bench.build(b, TINY, str(tmp_path))
    bench.train_steps(prog, prog.data, 11, b.batch_size)
    assert len(prog.data) == 32 and prog.state.step == 11
