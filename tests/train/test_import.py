"""Import boundaries: `import train`, its config and the run reader stay light; TF/TFDS
load only on the CIFAR path; no module of train/ imports itself through others."""

import ast
import pathlib
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


def _train_imports():
  """{module: the train modules it imports, at the top or inside a function}."""
  root = pathlib.Path(__file__).resolve().parents[2]
  modules = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (root / "train").rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        found.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        # `from train import task` imports the module train.task; `from train.task
        # import Task` the module train.task
        found.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                     else node.module for a in node.names)
    graph[name] = {m for m in found if m in modules and m != name}
  return graph


def test_train_has_no_import_cycles():
  graph = _train_imports()
  done, path = set(), []

  def visit(name):
    if name in path:
      raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
    if name in done:
      return
    path.append(name)
    for dep in sorted(graph[name]):
      visit(dep)
    path.pop()
    done.add(name)

  assert "train.task" in graph and graph["train.loop"]  # the walk sees the harness
  for name in sorted(graph):
    visit(name)


def test_task_interface_imports_no_task():
  mods = _modules_after("import train.task")
  assert not {"train.image_task", "train.lm.harness", "train.tasks"} & mods
