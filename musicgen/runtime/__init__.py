"""How the models run, apart from what they compute (musicgen/model/ holds the networks and the
sampling maths):

- plans.py: the execution plan and compile settings, resolved once per model for its family and
  device (`resolve_execution`) and applied after loading (`apply_execution`);
- projections.py: DiffRhythm 1's fused and packed projections, subclasses swapped in on the modules;
- compile.py: compiling and uncompiling modules, compile-or-fall-back with a probe;
- workers.py: the row workers of the `parallel` plan;
- graphs.py: the CUDA-graph helper both samplers use;
- device.py: device selection and the dtype policy.
"""
