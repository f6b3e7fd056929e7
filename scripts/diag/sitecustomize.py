"""Diagnostic for the compiled-prefill failure (benchmarks/NOTES.md, session 6): torch 2.11's Inductor raised
``KeyError: 'opN'`` in ``Scheduler.compute_ancestors``, whose loop assumes the node list is in topological order.
On that error, print every node that depends on an op listed after it, with what it reads and where both came
from. Put this directory on PYTHONPATH (Python imports ``sitecustomize`` at start-up):

    PYTHONPATH=$PYTHONPATH:$PWD/scripts/diag torchrun --standalone --nproc-per-node 1 benchmarks/bench_e2e.py \\
        --modes dcp --compile eager --batch 8 --context 8192 --layers 2 --prefill-compile inductor
"""
try:
    from torch._inductor import scheduler as _scheduler

    _compute_ancestors = _scheduler.Scheduler.compute_ancestors

    def _origins(node):
        ir = getattr(node, "node", None)
        return [str(o) for o in list(getattr(ir, "origins", []))[:4]]

    def _diagnosed(self):
        try:
            return _compute_ancestors(self)
        except KeyError as error:
            print(f"DIAG KeyError {error} in compute_ancestors; {len(self.nodes)} nodes", flush=True)
            seen = set()
            for node in self.nodes:
                for dep in sorted(node.unmet_dependencies, key=str):
                    buf = self.name_to_buf.get(dep.name)
                    op = buf.defining_op_name() if buf is not None else None
                    if op is not None and op not in seen:
                        print(f"DIAG {node.get_name()} ({type(getattr(node, 'node', None)).__name__}, "
                              f"{_origins(node)}) reads {dep} of {op} "
                              f"({_origins(self.name_to_fused_node.get(op)) if hasattr(self, 'name_to_fused_node') else ''}),"
                              " which comes later", flush=True)
                seen.add(node.get_name())
            raise

    _scheduler.Scheduler.compute_ancestors = _diagnosed
except Exception as exc:  # noqa: BLE001 - a diagnostic: never stop the program
    print("DIAG not installed:", exc)
