"""What keeps a task to itself: a user of its own, cgroups of its own, only its own GPU
device nodes, a clean environment. Standard library only: the task runner, which
applies it, imports nothing heavy."""
