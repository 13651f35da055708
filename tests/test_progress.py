"""Progress lines: rate, ETA, and how often they are printed."""
from diffusion_jax import progress


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
