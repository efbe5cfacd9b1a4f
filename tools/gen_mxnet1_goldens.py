"""Generate golden vectors from the real Apache MXNet 1.9.1 ``mxnet.optimizer.LARS``.

Covers what ``tests/data/golden_mxnet_1.9.1.json`` does not: every way of calling the optimizer (one
``update_multi_precision`` call with all indices, one call per index, explicit chunks, and the ``Updater``
with ``MXNET_OPTIMIZER_AGGREGATION_SIZE`` 1, 2 and 4), the momentum correction tracked per call (schedulers
with warm-up and decay, ``set_learning_rate`` between steps, an lr that drops to 0, ``momentum_correction=False``),
the ``_weight``-only wd_mult rule (and ``set_wd_mult``, ``param_dict`` over it), ``learning_rate=None``,
``clip_gradient`` 0 and negative, ``eps``, multi_precision fp16 (``(mom, master)`` states), fp16 without
multi_precision, mixed dtypes through the Updater, and row_sparse gradients (lazy and standard updates).

Run it under the MXNet 1.9.1 CPU wheel, in a virtual environment of its own (the wheel needs numpy < 1.24):

    python3 -m venv venv-mx1 && venv-mx1/bin/pip install numpy==1.23.5 mxnet==1.9.1
    venv-mx1/bin/python tools/gen_mxnet1_goldens.py tests/data/golden_mxnet_1.9.1_extra.json

Inputs are random but seeded, so a re-run reproduces the file. ``tests/test_mxnet_v1.py`` replays every case
through ``larsopt.mxnet.v1`` from the JSON alone.

JSON layout::

    {"mxnet_version": ..., "format": 1,
     "inputs": {NAME: {"dtypes": [per param], "w": [per param nested list], "g": [per step [per param]]}},
     "cases": {CASE: {...}}}

A case::

    "kw":          keyword arguments of mxnet.optimizer.LARS
    "aggregation": MXNET_OPTIMIZER_AGGREGATION_SIZE when the optimizer was made (a string; absent: unset, 4)
    "names":       optional [[index, name], ...]    -> param_idx2name
    "sched":       optional {"cls": "FactorScheduler" | "MultiFactorScheduler" | "PolyScheduler" |
                              "CosineScheduler", "args": {...}}   -> lr_scheduler=mxnet.lr_scheduler.<cls>(**args)
    "param_dict":  optional [[index, lr_mult, wd_mult], ...]  -> param_dict={index: obj with .lr_mult/.wd_mult}
    "mult_calls":  optional [["set_lr_mult" | "set_wd_mult", [[key, value], ...]], ...] made after construction
    "set_lr":      optional {step (str): lr}: opt.set_learning_rate(lr) before that step (0-based)
    "inputs":      key into "inputs"; param p has MXNet index indices[p]
    "indices":     MXNet index of each param
    "driver":      "all":       S = [opt.create_state_multi_precision(indices[p], W[p])] once, then per step
                                opt.update_multi_precision([indices...], W, G, S)   (one call, all params)
                   "per_index": the same states; per step, for each p: opt.update_multi_precision(indices[p], W[p],
                                G[p], S[p]) (single arrays, not lists)
                   "chunks":    the same states; per step, for each chunk (a list of positions) of "chunks": one
                                update_multi_precision call with those params (lists)
                   "updater":   u = mxnet.optimizer.get_updater(opt); per step u([indices...], G, W)
    "sparse":      optional {param position (str): [rows per step]}: that gradient is row_sparse holding those
                   rows (the stored dense grad is zero elsewhere); torch: sparse COO with sparse_dim == 1
    "all_rows_sparse": optional true: every gradient is row_sparse holding all its rows, numerically the dense
                   gradient, which sends MXNet down its python path (float16 norms from float32 squares); replayed
                   with dense gradients
    "out":         "weights":    per step, per param, weights after the step
                   "states":     per step, per param: null (no state) or {"mom": ..., "master": ...} (keys present
                                 only when MXNet has them; master = the fp32 copy under multi_precision)
                   "num_update": per step, opt.num_update after the step
                   "last_lr", "cur_lr": per step, the optimizer's attributes after the step
"""
import json
import os
import sys
import warnings

import numpy as np
import mxnet as mx
from mxnet import lr_scheduler as mxs

warnings.filterwarnings("ignore")


def enc(a, dtype):
    """Nested lists of the shortest decimals that round-trip to `dtype` (float32 or float16)."""
    a = np.asarray(a).astype(dtype)
    flat = []
    for v in a.ravel():
        f = float(repr(v)) if np.isfinite(v) else float(v)
        assert np.isnan(v) or np.array(f, dtype=dtype) == v
        flat.append(f)
    return np.array(flat, dtype=object).reshape(a.shape).tolist()


# --------------------------------------------------------------------------------------------- inputs

INPUTS = {}


def make_inputs(name, seed, shapes, steps, wscale, gscale, dtypes=None, sparse_rows=None):
    """Weights N(0, wscale[p]^2) + a small offset, grads N(0, gscale[p]^2); mixed signs everywhere."""
    rng = np.random.RandomState(seed)
    dtypes = dtypes or ['float32'] * len(shapes)
    ws = [(rng.randn(*s) * wscale[p] + 0.1 * wscale[p]).astype(dtypes[p]) for p, s in enumerate(shapes)]
    gs = []
    for t in range(steps):
        row = []
        for p, s in enumerate(shapes):
            g = (rng.randn(*s) * gscale[p]).astype(dtypes[p])
            if sparse_rows and p in sparse_rows:
                mask = np.zeros(s[0], bool)
                mask[sparse_rows[p][t]] = True
                g[~mask] = 0
            row.append(g)
        gs.append(row)
    INPUTS[name] = dict(dtypes=dtypes, w=ws, g=gs)


# The inputs of tests/data/golden_mxnet_1.9.1.json (its W0 and GS), for its cases on the other drivers.
INPUTS['golden'] = dict(
    dtypes=['float32'] * 2,
    w=[np.array([[0.1, 0.2], [0.3, 0.4]], np.float32), np.array([0.5, -0.25, 0.125], np.float32)],
    g=[[np.array([[0.5, -0.5], [1.0, 2.0]], np.float32), np.array([0.3, 0.0, -0.6], np.float32)],
       [np.array([[-0.2, 0.4], [0.1, -1.5]], np.float32), np.array([0.05, 0.7, 0.2], np.float32)],
       [np.array([[0.9, 0.1], [-0.3, 0.6]], np.float32), np.array([-0.4, 0.1, 0.0], np.float32)]])
S5 = [(4,), (3, 2), (2, 2, 1, 2), (5,), (2, 3)]
make_inputs('five', 11, S5, 5, [0.5, 1.0, 0.3, 0.8, 0.6], [0.2, 1.5, 0.1, 0.5, 0.3])
make_inputs('five_b', 12, S5, 5, [2.0, 0.3, 1.0, 0.4, 0.9], [1.0, 0.05, 0.3, 0.8, 0.2])
make_inputs('fp16_4', 13, S5[:4], 5, [0.5, 1.0, 0.3, 0.8], [0.2, 1.5, 0.1, 0.5], dtypes=['float16'] * 4)
make_inputs('mixed5', 14, S5, 5, [0.5, 1.0, 0.3, 0.8, 0.6], [0.2, 1.5, 0.1, 0.5, 0.3],
            dtypes=['float32', 'float16', 'float32', 'float16', 'float32'])
make_inputs('const3', 15, [(1,), (1,), (1,)], 3, [0.0] * 3, [0.0] * 3)
for t in range(3):
    INPUTS['const3']['g'][t] = [np.ones(1, np.float32)] * 3
SPR = {0: [[1, 3], [0, 5], [2], [1, 3, 4], [0, 1, 2, 3, 4, 5]],
       1: [[0, 4], [], [1, 2, 3], [4], [0, 2]],
       2: [[2, 7], [0], [1, 2, 3, 4, 5], [6], [3, 7]]}
make_inputs('sparse', 16, [(6, 3), (5, 2, 2, 1), (8,), (4, 2)], 5, [0.5, 1.0, 0.3, 0.8], [0.2, 1.5, 0.1, 0.5],
            sparse_rows=SPR)
make_inputs('sparse16', 17, [(6, 3), (5, 2, 2, 1), (8,), (4, 2)], 5, [0.5, 1.0, 0.3, 0.8], [0.2, 1.5, 0.1, 0.5],
            sparse_rows=SPR, dtypes=['float16'] * 4)


# --------------------------------------------------------------------------------------------- running

SCHED = {'FactorScheduler': mxs.FactorScheduler, 'MultiFactorScheduler': mxs.MultiFactorScheduler,
         'PolyScheduler': mxs.PolyScheduler, 'CosineScheduler': mxs.CosineScheduler}


class _Mults:
    def __init__(self, lr_mult, wd_mult):
        self.lr_mult = lr_mult
        self.wd_mult = wd_mult


def _state_rec(s, dtype):
    if s is None:
        return None
    if isinstance(s, (tuple, list)):
        mom, master = s
        r = {'master': enc(master.asnumpy(), 'float32')}
        if mom is not None:
            r['mom'] = enc(mom.asnumpy(), 'float32')
        return r
    return {'mom': enc(s.tostype('default').asnumpy(), dtype)}


def _grad(g, rows, dtype):
    if rows is None:
        return mx.nd.array(g, dtype=dtype)
    rows = sorted(rows)
    data = g[rows] if rows else np.zeros((0,) + g.shape[1:], g.dtype)
    return mx.nd.sparse.row_sparse_array((data, np.array(rows, np.int64)), shape=g.shape, dtype=dtype)


def run_case(case):
    inp = INPUTS[case['inputs']]
    kw = dict(case['kw'])
    if 'names' in case:
        kw['param_idx2name'] = {i: n for i, n in case['names']}
    if 'sched' in case:
        kw['lr_scheduler'] = SCHED[case['sched']['cls']](**case['sched']['args'])
    if 'param_dict' in case:
        kw['param_dict'] = {i: _Mults(lm, wm) for i, lm, wm in case['param_dict']}
    os.environ.pop('MXNET_OPTIMIZER_AGGREGATION_SIZE', None)
    if 'aggregation' in case:
        os.environ['MXNET_OPTIMIZER_AGGREGATION_SIZE'] = case['aggregation']
    opt = mx.optimizer.LARS(**kw)
    os.environ.pop('MXNET_OPTIMIZER_AGGREGATION_SIZE', None)
    for meth, items in case.get('mult_calls', []):
        getattr(opt, meth)({k: v for k, v in items})
    idx = case['indices']
    dts = inp['dtypes']
    W = [mx.nd.array(w, dtype=dts[p]) for p, w in enumerate(inp['w'])]
    sparse = {int(p): rows for p, rows in case.get('sparse', {}).items()}
    npar = len(W)
    driver = case['driver']
    if driver == 'updater':
        upd = mx.optimizer.get_updater(opt)
    else:
        S = [opt.create_state_multi_precision(idx[p], W[p]) for p in range(npar)]
    out = dict(weights=[], states=[], num_update=[], last_lr=[], cur_lr=[])
    for t in range(len(inp['g'])):
        if str(t) in case.get('set_lr', {}):
            opt.set_learning_rate(case['set_lr'][str(t)])
        G = [_grad(inp['g'][t][p], sparse[p][t] if p in sparse else None, dts[p]) for p in range(npar)]
        if driver == 'updater':
            upd(list(idx), G, W)
            states = [upd.states.get(idx[p]) for p in range(npar)]
        else:
            if driver == 'all':
                calls = [list(range(npar))]
            elif driver == 'chunks':
                calls = case['chunks']
            else:
                calls = [p for p in range(npar)]
            for call in calls:
                if isinstance(call, list):
                    opt.update_multi_precision([idx[p] for p in call], [W[p] for p in call], [G[p] for p in call],
                                               [S[p] for p in call])
                else:
                    opt.update_multi_precision(idx[call], W[call], G[call], S[call])
            states = S
        out['weights'].append([enc(w.asnumpy(), dts[p]) for p, w in enumerate(W)])
        out['states'].append([_state_rec(s, dts[p]) for p, s in enumerate(states)])
        out['num_update'].append(int(opt.num_update))
        out['last_lr'].append(float(opt.last_lr))
        out['cur_lr'].append(float(opt.cur_lr))
    return out


CASES = {}
DRIVERS = {'all': {}, 'per_index': {}, 'agg1': dict(driver='updater', aggregation='1'),
           'agg2': dict(driver='updater', aggregation='2'), 'agg4': dict(driver='updater')}


def add(name, kw, drivers=tuple(DRIVERS), inputs='five', **extra):
    indices = extra.pop('indices', None)
    for d in drivers:
        case = dict(kw=dict(kw), inputs=inputs, driver=d, indices=indices or list(range(len(INPUTS[inputs]['w']))))
        case.update(DRIVERS.get(d, {}))
        case.update(extra)
        case['out'] = run_case(case)
        CASES['%s@%s' % (name, d)] = case


# ---- 0. the cases of golden_mxnet_1.9.1.json, called one index at a time and through the Updater ----------
G_B = dict(learning_rate=0.1, momentum=0.9, wd=0.01, eta=0.01, rescale_grad=0.5, clip_gradient=0.4)
G_DRIVERS = ('all', 'per_index', 'agg1', 'agg4')
add('golden/V1_F_factor_scheduler_momentum_correction', dict(learning_rate=0.1, momentum=0.9, eta=0.01),
    inputs='golden', drivers=G_DRIVERS, sched=dict(cls='FactorScheduler', args=dict(step=1, factor=0.5, base_lr=0.1)))
add('golden/V1_B_mom_wd_clip_rescale_eps0', G_B, inputs='golden', drivers=G_DRIVERS)
add('golden/V1_C_names_weight_bias', G_B, inputs='golden', drivers=G_DRIVERS,
    names=[[0, 'fc_weight'], [1, 'fc_bias']])

# ---- 1. the momentum correction -----------------------------------------------------------------------
MOM = dict(momentum=0.9, wd=1e-3, eta=0.05)
BIAS3 = [[0, 'a_bias'], [1, 'b_bias'], [2, 'c_bias']]
add('correction/spec_example', dict(momentum=0.9), inputs='const3', names=BIAS3,
    sched=dict(cls='FactorScheduler', args=dict(step=1, factor=0.5, base_lr=1.0)))
add('correction/factor', dict(MOM), sched=dict(cls='FactorScheduler', args=dict(step=1, factor=0.5, base_lr=0.4)))
add('correction/poly_warmup', dict(MOM), sched=dict(cls='PolyScheduler', args=dict(
    max_update=5, base_lr=0.5, pwr=2, final_lr=0.01, warmup_steps=3, warmup_begin_lr=0.05)))
add('correction/cosine_warmup_lr_given', dict(MOM, learning_rate=0.3), sched=dict(cls='CosineScheduler', args=dict(
    max_update=5, base_lr=0.5, final_lr=0.02, warmup_steps=2, warmup_begin_lr=0.0)))
add('correction/multifactor_constant_warmup', dict(MOM, learning_rate=None), sched=dict(
    cls='MultiFactorScheduler', args=dict(step=[2, 4], factor=0.3, base_lr=0.5, warmup_steps=2,
                                          warmup_begin_lr=0.1, warmup_mode='constant')))
add('correction/off', dict(MOM, momentum_correction=False),
    sched=dict(cls='FactorScheduler', args=dict(step=1, factor=0.5, base_lr=0.4)))
add('correction/set_learning_rate', dict(MOM, learning_rate=0.2), set_lr={'1': 0.4, '2': 0.1, '4': 0.3})
add('correction/lr_drops_to_zero', dict(MOM, learning_rate=0.2), set_lr={'2': 0.0, '3': 0.25})
add('correction/chunks', dict(MOM), drivers=('chunks',), chunks=[[3, 0], [4], [1, 2]],
    sched=dict(cls='FactorScheduler', args=dict(step=1, factor=0.5, base_lr=0.4)))
add('correction/begin_num_update', dict(MOM, begin_num_update=3, learning_rate=None),
    sched=dict(cls='FactorScheduler', args=dict(step=2, factor=0.5, base_lr=0.4, warmup_steps=5,
                                                warmup_begin_lr=0.05)))
add('correction/nomom', dict(eta=0.1, wd=0.01), sched=dict(cls='FactorScheduler', args=dict(
    step=1, factor=0.5, base_lr=0.4)), drivers=('all', 'agg1'))

# ---- 2. defaults, weight decay multipliers, clip ---------------------------------------------------------
N5 = [[0, 'conv0_weight'], [1, 'bn0_gamma'], [2, 'conv0_bias'], [3, 'conv_w'], [4, 'fc_weight']]
WD = dict(momentum=0.9, wd=0.05, eta=0.1, learning_rate=0.3)
add('defaults/learning_rate_none', dict(momentum=0.9, eta=0.1), drivers=('all', 'agg4'))
add('defaults/all_defaults', dict(), drivers=('all',))
add('wd_mult/names', WD, names=N5, drivers=('all', 'agg2'))
add('wd_mult/set_wd_mult_keeps_rule', WD, names=N5, drivers=('all',),
    mult_calls=[['set_wd_mult', [['conv_w', 2.0], [4, 0.0]]], ['set_lr_mult', [['bn0_gamma', 3.0]]]])
add('wd_mult/param_dict_over_rule', WD, names=N5, drivers=('all',), param_dict=[[1, 1.0, 1.0], [2, 0.5, 2.0]])
add('wd_mult/partial_idx2name', WD, names=[[0, 'conv0_weight'], [3, 'fc_bias'], [9, 'unused_beta']],
    drivers=('all',))
HP = dict(momentum=0.9, wd=0.02, eta=0.1, learning_rate=0.3)
add('clip/zero_is_off', dict(HP, clip_gradient=0.0, rescale_grad=2.0), drivers=('all', 'agg4'))
add('clip/negative_is_off', dict(HP, clip_gradient=-0.5), drivers=('all',))
add('clip/tight', dict(HP, clip_gradient=0.05, rescale_grad=4.0), drivers=('all', 'agg1'))
add('hparams/eps_rescale', dict(HP, eps=0.5, rescale_grad=0.25), inputs='five_b', drivers=('all', 'agg4'))
add('hparams/nomom_wd', dict(eta=0.2, wd=0.03, learning_rate=0.5), drivers=('all', 'per_index'))
add('hparams/negative_momentum', dict(HP, momentum=-0.5), drivers=('all',))
add('hparams/lr_mult_by_index', dict(HP), drivers=('all', 'agg2'),
    mult_calls=[['set_lr_mult', [[1, 0.25], [3, 2.0]]], ['set_wd_mult', [[0, 0.0], [4, 3.0]]]])

# ---- 3. multi_precision fp16 and fp16 without it ----------------------------------------------------------
MP = dict(multi_precision=True, learning_rate=0.3, eta=0.1)
add('mp16/mom_wd_sched', dict(MP, momentum=0.9, wd=0.01, learning_rate=None), inputs='fp16_4',
    sched=dict(cls='FactorScheduler', args=dict(step=1, factor=0.7, base_lr=0.4)))
add('mp16/nomom_clip_rescale', dict(MP, clip_gradient=0.4, rescale_grad=0.5, wd=0.001), inputs='fp16_4',
    drivers=('all', 'per_index'))
add('mp16/names', dict(MP, momentum=0.9, wd=0.02), inputs='fp16_4', drivers=('all', 'agg2'),
    names=[[0, 'a_bias'], [1, 'b_weight'], [2, 'c_gamma'], [3, 'd_weight']])
add('fp16/mom_wd', dict(learning_rate=0.5, eta=0.2, momentum=0.9, wd=0.01), inputs='fp16_4',
    drivers=('all', 'per_index'))
add('mixed/updater', dict(MP, momentum=0.9, wd=0.01, learning_rate=None), inputs='mixed5',
    drivers=('agg1', 'agg2', 'agg4'),
    sched=dict(cls='FactorScheduler', args=dict(step=1, factor=0.5, base_lr=0.4)))

# The same float16 configurations with every gradient row_sparse holding all its rows: numerically the dense
# gradient, but MXNet 1.x then takes its python path, whose norms square float32 copies (its dense CPU path
# squares float16 elements in float16, its GPU path in float32). "all_rows_sparse" marks these cases.
F16_ALL_ROWS = {'all_rows_sparse': True}
add('mp16_f32_norms/mom_wd_sched', dict(MP, momentum=0.9, wd=0.01, learning_rate=None), inputs='fp16_4',
    drivers=('all', 'per_index', 'agg2'), sparse={str(p): [list(range(S5[p][0]))] * 5 for p in range(4)},
    sched=dict(cls='FactorScheduler', args=dict(step=1, factor=0.7, base_lr=0.4)), **F16_ALL_ROWS)
add('mp16_f32_norms/nomom_clip_rescale', dict(MP, clip_gradient=0.4, rescale_grad=0.5, wd=0.001), inputs='fp16_4',
    drivers=('all',), sparse={str(p): [list(range(S5[p][0]))] * 5 for p in range(4)}, **F16_ALL_ROWS)
add('mp16_f32_norms/names', dict(MP, momentum=0.9, wd=0.02), inputs='fp16_4', drivers=('all',),
    names=[[0, 'a_bias'], [1, 'b_weight'], [2, 'c_gamma'], [3, 'd_weight']],
    sparse={str(p): [list(range(S5[p][0]))] * 5 for p in range(4)}, **F16_ALL_ROWS)
add('fp16_f32_norms/mom_wd', dict(learning_rate=0.5, eta=0.2, momentum=0.9, wd=0.01), inputs='fp16_4',
    drivers=('all',), sparse={str(p): [list(range(S5[p][0]))] * 5 for p in range(4)}, **F16_ALL_ROWS)

# ---- 4. row_sparse gradients ----------------------------------------------------------------------------
SP = dict(learning_rate=0.3, eta=0.1, wd=0.02)
SPARSE3 = {'0': SPR[0], '1': SPR[1], '2': SPR[2]}
for lazy in (True, False):
    for mom in (0.0, 0.9):
        add('sparse/lazy_%s_mom%s' % (lazy, mom), dict(SP, lazy_update=lazy, momentum=mom), inputs='sparse',
            drivers=('all', 'agg1'), sparse=SPARSE3)
add('sparse/mixed_dense_sched', dict(SP, momentum=0.9, clip_gradient=0.2, rescale_grad=2.0), inputs='sparse',
    drivers=('all', 'agg4'), sparse={'0': SPR[0], '2': SPR[2]},
    names=[[0, 'emb_weight'], [1, 'x_weight'], [2, 'emb_bias']],
    sched=dict(cls='FactorScheduler', args=dict(step=1, factor=0.5, base_lr=0.4)))
add('sparse/mp16', dict(SP, momentum=0.9, multi_precision=True), inputs='sparse16', drivers=('all',),
    sparse=SPARSE3)

res = dict(mxnet_version=mx.__version__, format=1,
           inputs={k: dict(dtypes=v['dtypes'], w=[enc(w, v['dtypes'][p]) for p, w in enumerate(v['w'])],
                           g=[[enc(g, v['dtypes'][p]) for p, g in enumerate(row)] for row in v['g']])
                   for k, v in INPUTS.items()},
           cases=CASES)
with open(sys.argv[1], 'w') as f:
    json.dump(res, f, indent=None, separators=(',', ':'))
    f.write('\n')
print('wrote', sys.argv[1], len(CASES), 'cases')
