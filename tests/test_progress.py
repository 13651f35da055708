"""Progress lines: rate, ETA, and how often they are printed."""
from diffusion_jax import progress


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_format_duration():
  assert progress.format_duration(0) == "0:00:00"
  assert progress.format_duration(59.9) == "0:00:59"
  assert progress.format_duration(3 * 3600 + 25 * 60 + 7) == "3:25:07"
  assert progress.format_duration(-5) == "0:00:00"


def test_rate_and_eta_from_the_work_done_so_far():
  clock, lines = FakeClock(), []
  bar = progress.Progress("sample", total=1000, unit="images", every_s=10.0, clock=clock,
                          print_fn=lines.append)
  clock.now += 20.0
  assert bar.line(250) == ("sample: 250/1000 images (12.5 images/s, ETA 0:01:00, "
                           "elapsed 0:00:20)")
  assert bar.line(0).endswith("(0 images/s, ETA ?, elapsed 0:00:20)")
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
  assert "ETA 0:00:00" in lines[-1]
