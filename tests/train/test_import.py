"""Import boundaries: `import train`, its config and the run reader stay light; TF/TFDS
load only on the CIFAR path."""

import subprocess
import sys


def _modules_after(code):
  out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sys.modules))"],
                       capture_output=True, text=True, check=True, timeout=120)
  return set(out.stdout.split())


def test_import_train_is_light():
  mods = _modules_after("import train, train.config, train.report.reader, train.report.summary")
  assert not {"jax", "flax", "orbax", "tensorflow", "tensorflow_datasets"} & mods


def test_fashion_mnist_path_never_imports_tensorflow():
  mods = _modules_after("import train.cli, train.data, train.diagnostics, train.loop, "
                        "train.mesh, train.optim, train.profile, train.steps\n"
                        "train.data.synthetic_dataset(4)")
  assert "tensorflow" not in mods and "tensorflow_datasets" not in mods
