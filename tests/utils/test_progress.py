"""Progress lines: rate, ETA, and how often they are printed."""
from diffusion_jax.utils import progress


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_format_duration():
  assert progress.format_duration(0) == "00:00"
  assert progress.format_duration(59.9) == "00:59"
  assert progress.format_duration(3 * 3600 + 25 * 60 + 7) == "3:25:07"
  assert progress.format_duration(-5) == "00:00"


def test_rate_and_eta_from_the_work_done_so_far():
  clock, lines = FakeClock(), []
  bar = progress.Progress("sample", total=1000, unit="images", every_s=10.0, clock=clock,
                          print_fn=lines.append)
  clock.now += 20.0
  assert bar.line(250) == "sample: 250/1000 images (12.5 images/s, ETA 01:00, elapsed 00:20)"
  assert bar.line(0).endswith("(0 images/s, ETA ?, elapsed 00:20)")
  assert bar.line(5000).startswith("sample: 1000/1000 images")  # a padded last batch


def test_prints_first_every_interval_and_last():
  clock, lines = FakeClock(), []
  bar = progress.Progress("eval", total=100, unit="images", every_s=10.0, clock=clock,
                          print_fn=lines.append)
  for done in range(10, 101, 10):
    clock.now += 3.0
    bar.update(done)
  # Updates every 3 s: lines at t = 3 (the first), 15 and 27 (>= 10 s after the previous
  # line), and 30 (the last).
  assert [line.split()[1] for line in lines] == ["10/100", "50/100", "90/100", "100/100"]
  assert "ETA 00:00" in lines[-1]


def test_a_terminal_gets_a_live_bar_that_ends_at_the_total(monkeypatch, capsys):
  monkeypatch.setattr("sys.stdout.isatty", lambda: True, raising=False)
  bar = progress.Progress("sample", total=8, unit="images")
  assert bar._bar is not None  # pylint: disable=protected-access
  bar.update(4)
  bar.update(16)  # a padded last batch counts up to the total
  assert bar._bar.n == 8  # pylint: disable=protected-access
  assert "8/8" in capsys.readouterr().out


def _training_like_run(num_steps, seconds_per_step, log_every, every_s=10.0):
  """Progress used as the training loop uses it: a line when `due` (values fetched only then)
  or forced every `log_every` steps and at the end. Returns (lines, {step: fake time})."""
  from diffusion_jax.training import loop as train  # pylint: disable=g-import-not-at-top
  clock, lines, fetched = FakeClock(), [], {}
  progress_ = progress.Progress("train", total=num_steps, unit="steps", every_s=every_s,
                                line_format=train._TRAIN_LINE,  # pylint: disable=protected-access
                                clock=clock, print_fn=lines.append)
  start = clock.now
  for step in range(1, num_steps + 1):
    clock.now += seconds_per_step
    force = step % log_every == 0 or step == num_steps
    due = force or progress_.due(step)
    if due:
      fetched[step] = clock.now - start
      progress_.update(step, "loss 0.0412  grad_norm 0.311", due=True, force=force,
                       images_per_s=progress_.rate(step) * 32)
    else:
      progress_.update(step, due=False)
  return lines, fetched


def test_training_lines_come_about_every_10_s_with_step_loss_rate_and_eta():
  # The demo's cadence: 18 steps/s, log_every 500; a 400-step run.
  lines, fetched = _training_like_run(400, 1 / 18, log_every=500)
  steps = [int(line.split()[1].split("/")[0]) for line in lines]
  assert len(lines) > 1
  assert steps == sorted(fetched) == [1, 181, 361, 400]  # t = 0.06 s, 10.06 s, 20.06 s, 22.2 s
  for line in lines:
    assert line.startswith("step ") and "/400  loss 0.0412  grad_norm 0.311" in line
    assert "18.00 steps/s  576.0 images/s  ETA " in line
  assert lines[0].endswith("ETA 00:22  (elapsed 00:00)")
  assert lines[-1].endswith("ETA 00:00  (elapsed 00:22)")


def test_lines_every_log_every_steps_restart_the_10_s_interval():
  lines, _ = _training_like_run(100, 1.0, log_every=25)
  steps = [int(line.split()[1].split("/")[0]) for line in lines]
  # Forced at 25, 50, 75, 100; due at 1 (the first), 11, 21 and 10 s after each forced line.
  assert steps == [1, 11, 21, 25, 35, 45, 50, 60, 70, 75, 85, 95, 100]


def test_due_is_false_on_other_processes(monkeypatch):
  monkeypatch.setattr(progress.jax, "process_index", lambda: 1)
  lines = []
  bar = progress.Progress("eval", total=10, clock=FakeClock(), print_fn=lines.append)
  assert not bar.due(1) and not bar.update(10, force=True)
  assert not lines


def test_a_resumed_run_counts_its_rate_from_where_it_resumed_and_the_eta_within_the_limit():
  clock = FakeClock()
  bar = progress.Progress("train", total=1000, unit="steps", initial=600, time_limit_s=30.0,
                          clock=clock, print_fn=lambda line: None)
  clock.now += 10.0
  assert bar.rate(700) == 10.0
  # 300 steps at 10 steps/s would take 30 s, but the limit ends the run in 20 s.
  assert bar.line(700) == "train: 700/1000 steps (10 steps/s, ETA 00:20, elapsed 00:10)"


def test_a_terminal_bar_shows_the_values_and_keeps_forced_lines_above_it(monkeypatch, capsys):
  monkeypatch.setattr("sys.stdout.isatty", lambda: True, raising=False)
  clock = FakeClock()
  bar = progress.Progress("train", total=10, unit="steps", line_format="step {n}: {values}",
                          clock=clock)
  assert bar.due(1) and bar.update(1, "loss 0.5")
  assert not bar.due(2)  # values refresh once a second, the bar at every update
  clock.now += progress.BAR_VALUES_EVERY_S
  assert bar.due(2) and bar.update(2, "loss 0.4")
  assert bar._bar.postfix == "loss 0.4"  # pylint: disable=protected-access
  bar.update(5, "loss 0.3", force=True)
  bar.update(10, "loss 0.2")
  out = capsys.readouterr().out
  assert "step 5: loss 0.3\n" in out and "10/10" in out and "loss 0.2" in out
