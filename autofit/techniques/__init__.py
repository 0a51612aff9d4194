"""One module per memory-saving technique. Each has a pure side (what it saves and costs, used by the
memory and time models and the search) and an apply side (what it changes in a model, optimizer or data
loader, used by the executor)."""
