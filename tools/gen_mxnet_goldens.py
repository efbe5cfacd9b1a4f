"""Generate extra golden vectors from the real Apache MXNet 2.0 ``mxnet.optimizer.LARS``.

Covers what ``tests/data/golden_mxnet_2.0.0b1.json`` does not: schedulers with warm-up (and the
``learning_rate`` default overwriting a scheduler's base_lr), lr/wd multipliers by name, by index and via
``param_dict``, ``begin_num_update``, the gamma/beta/bias name exclusion, hyper-parameter variations,
``Updater`` grouping (aggregate_num 1, 4 and numpy.inf, mixed dtypes), multi_precision fp16, fp16 without
multi_precision, and row_sparse gradients (lazy and standard updates).

Run it under the MXNet 2.0.0b1 CPU wheel, in a virtual environment of its own (the wheel needs numpy < 1.24):

    python3 -m venv venv-mx2 && venv-mx2/bin/pip install numpy==1.23.5 mxnet==2.0.0b1
    venv-mx2/bin/python tools/gen_mxnet_goldens.py tests/data/golden_mxnet_extra.json

Inputs are random but seeded, so a re-run reproduces the file. ``tests/test_mxnet_extra_goldens.py`` replays
every case through ``larsopt.mxnet`` from the JSON alone.

JSON layout::

    {"mxnet_version": ..., "format": 1,
     "inputs": {NAME: {"dtypes": [per param], "weights": [per param nested list],
                       "grads": [per step [per param nested list]]}},
     "cases": {CASE: {...}},        # replayed by the tests
     "mxnet_bug": {CASE: {...}}}    # MXNet is wrong by design here (spec section 8); kept for reference only

A case::

    "group":      what it covers
    "path":       which MXNet code path: step (use_fused_step=False), fused_agg1 (the defaults), fused_agg4
                  (aggregate_num=4), fused_agginf, step_agg1, step_agg4, ... (also spelled out in "kw")
    "kw":         keyword arguments of mxnet.optimizer.LARS (aggregate_num numpy.inf is written "inf";
                  learning_rate absent means LARS's default 0.1 was used)
    "names":      optional [[index, name], ...]    -> param_idx2name
    "sched":      optional {"cls": "FactorScheduler" | "MultiFactorScheduler" | "PolyScheduler" |
                             "CosineScheduler", "args": {...}}   -> lr_scheduler=mxnet.lr_scheduler.<cls>(**args)
    "param_dict": optional [[index, lr_mult, wd_mult], ...]  -> param_dict={index: obj with .lr_mult/.wd_mult}
    "mult_calls": optional [["set_lr_mult" | "set_wd_mult", [[key, value], ...]], ...]  made in order after
                  construction (key: int index or str name)
    "inputs":     key into "inputs"; param p has MXNet index indices[p]
    "indices":    MXNet index of each param
    "driver":     "direct":  S = [opt.create_state_multi_precision(indices[p], W[p])] once, then per step
                             opt.update_multi_precision([indices...], W, G, S)   (one call, all params)
                  "updater": u = mxnet.optimizer.get_updater(opt); per step u([indices...], G, W)
    "active":     optional, per step, the param positions passed at that step (default: all, in order)
    "sparse":     optional {param position (str): [rows per step]}: that gradient is row_sparse holding those
                  rows (the stored dense grad is zero elsewhere); torch: sparse COO with sparse_dim == 1
    "out":        "weights":    per step, per param, weights after the step
                  "states":     per step: null (not recorded: only the updater and sparse groups record states
                                after every step, the others after the last step) or, per param, null or
                                {"mom": ..., "master": ...} (keys present only when MXNet has them; master =
                                the fp32 copy under multi_precision; null also for an index the Updater has not
                                seen yet)
                  "num_update": per step, opt.num_update after the step
                  "lr":         per step, opt.learning_rate after the step
"""
import json
import sys
import warnings

import numpy as np
import mxnet as mx
from mxnet import lr_scheduler as mxs

warnings.filterwarnings("ignore")
mx.random.seed(0)

# --------------------------------------------------------------------------------------------- encoding


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
    return name


S3 = [(5,), (3, 2), (2, 2, 1, 2)]
make_inputs('std3', 1, S3, 6, [0.5, 1.0, 0.2], [0.1, 2.0, 0.05])
make_inputs('std3b', 2, S3, 5, [2.0, 0.3, 1.0], [1.0, 0.01, 0.3])
S7 = [(3,), (4, 2), (5,), (2, 2, 1, 3), (3,), (4,), (2, 3)]
make_inputs('seven', 3, S7, 5, [0.5, 1.0, 0.3, 0.8, 0.4, 0.6, 1.2], [0.2, 0.5, 0.1, 1.0, 0.3, 0.05, 0.4])
S4 = [(6,), (3, 4), (2, 2, 2, 2), (5, 1)]
make_inputs('fp16_4', 4, S4, 5, [0.5, 1.0, 0.3, 0.8], [0.2, 1.5, 0.1, 0.5], dtypes=['float16'] * 4)
SM = [(5,), (3, 2), (2, 2, 1, 2), (4,), (2, 3), (2, 1, 2, 2), (3,)]
make_inputs('mixed7', 5, SM, 5, [0.5, 1.0, 0.3, 0.8, 0.6, 0.4, 1.0], [0.2, 1.5, 0.1, 0.5, 0.3, 0.05, 0.7],
            dtypes=['float32', 'float16', 'float32', 'float16', 'float32', 'float32', 'float16'])
SPR = {0: [[1, 3], [0, 5], [2], [1, 3, 4], [0, 1, 2, 3, 4, 5]],
       1: [[0, 4], [], [1, 2, 3], [4], [0, 2]],
       2: [[2, 7], [0], [1, 2, 3, 4, 5], [6], [3, 7]]}
SSP = [(6, 3), (5, 2, 2, 1), (8,), (4, 2)]
make_inputs('sparse', 6, SSP, 5, [0.5, 1.0, 0.3, 0.8], [0.2, 1.5, 0.1, 0.5], sparse_rows=SPR)
make_inputs('fp16_big', 7, S3, 5, [1.0, 2.0, 0.5], [0.5, 1.0, 0.2], dtypes=['float16'] * 3)
make_inputs('fp16_same', 8, [(3, 2), (3, 2)], 3, [0.5, 1.0], [0.2, 1.5], dtypes=['float16'] * 2)


# --------------------------------------------------------------------------------------------- running

SCHED = {'FactorScheduler': mxs.FactorScheduler, 'MultiFactorScheduler': mxs.MultiFactorScheduler,
         'PolyScheduler': mxs.PolyScheduler, 'CosineScheduler': mxs.CosineScheduler}


class _Mults:
    def __init__(self, lr_mult, wd_mult):
        self.lr_mult = lr_mult
        self.wd_mult = wd_mult


def _kw_to_mx(kw):
    k = dict(kw)
    if k.get('aggregate_num') == 'inf':
        k['aggregate_num'] = np.inf
    return k


def _state_rec(s, dtype):
    if s is None:
        return None
    if isinstance(s, (tuple, list)):
        master, mom = s
        r = {'master': enc(master.asnumpy(), 'float32')}
        if mom is not None:
            r['mom'] = enc(mom.asnumpy(), 'float32')
        return r
    return {'mom': enc(s.tostype('default').asnumpy(), dtype)}


def run_case(case):
    inp = INPUTS[case['inputs']]
    kw = _kw_to_mx(case['kw'])
    if 'names' in case:
        kw['param_idx2name'] = {i: n for i, n in case['names']}
    if 'sched' in case:
        kw['lr_scheduler'] = SCHED[case['sched']['cls']](**case['sched']['args'])
    if 'param_dict' in case:
        kw['param_dict'] = {i: _Mults(lm, wm) for i, lm, wm in case['param_dict']}
    opt = mx.optimizer.LARS(**kw)
    for meth, items in case.get('mult_calls', []):
        getattr(opt, meth)({k: v for k, v in items})
    idx = case['indices']
    dts = inp['dtypes']
    W = [mx.nd.array(w, dtype=dts[p]) for p, w in enumerate(inp['w'])]
    sparse = {int(p): rows for p, rows in case.get('sparse', {}).items()}
    nsteps = case.get('steps', len(inp['g']))
    npar = len(W)
    if case['driver'] == 'direct':
        S = [opt.create_state_multi_precision(idx[p], W[p]) for p in range(npar)]
    else:
        upd = mx.optimizer.get_updater(opt)
    out = dict(weights=[], states=[], num_update=[], lr=[])
    for t in range(nsteps):
        G = []
        for p in range(npar):
            g = inp['g'][t][p]
            if p in sparse:
                rows = sorted(sparse[p][t])
                G.append(mx.nd.sparse.row_sparse_array(
                    (g[rows] if rows else np.zeros((0,) + g.shape[1:], g.dtype), np.array(rows, np.int64)),
                    shape=g.shape, dtype=dts[p]))
            else:
                G.append(mx.nd.array(g, dtype=dts[p]))
        act = case['active'][t] if 'active' in case else list(range(npar))
        if case['driver'] == 'direct':
            opt.update_multi_precision([idx[p] for p in act], [W[p] for p in act], [G[p] for p in act],
                                       [S[p] for p in act])
            states = S
        else:
            upd([idx[p] for p in act], [G[p] for p in act], [W[p] for p in act])
            states = [upd.states.get(idx[p]) for p in range(npar)]
        out['weights'].append([enc(w.asnumpy(), dts[p]) for p, w in enumerate(W)])
        if case['group'] in ALL_STATES or t == nsteps - 1:
            out['states'].append([_state_rec(s, dts[p]) if (case['driver'] == 'direct' or idx[p] in upd.states)
                                  else None for p, s in enumerate(states)])
        else:
            out['states'].append(None)
        out['num_update'].append(int(opt.num_update))
        out['lr'].append(float(opt.learning_rate))
    return out


CASES = {}
BUGS = {}
ALL_STATES = ('updater', 'sparse')  # these record states after every step; the others after the last step
PATHS = {'step': {'use_fused_step': False}, 'fused_agg1': {}, 'fused_agg4': {'aggregate_num': 4}}


def add(name, kw, paths=('step', 'fused_agg1', 'fused_agg4'), inputs='std3', driver='direct', bug=None,
        **extra):
    indices = extra.pop('indices', None)
    for pth in paths:
        k = dict(kw)
        k.update(PATHS[pth] if isinstance(pth, str) else pth[1])
        pname = pth if isinstance(pth, str) else pth[0]
        npar = len(INPUTS[inputs]['w'])
        case = dict(kw=k, inputs=inputs, driver=driver, indices=indices or list(range(npar)))
        case.update(extra)
        case['group'] = name.split('/')[0]
        case['path'] = pname
        cname = '%s@%s' % (name, pname)
        if bug is None:
            case['out'] = run_case(case)
            CASES[cname] = case
        else:
            case['reason'] = bug
            try:
                case['out'] = run_case(case)
            except Exception as e:  # MXNet raises here; record what it said
                lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
                msg = next((ln for ln in reversed(lines) if 'Error' in ln or 'Check failed' in ln), lines[-1])
                case['error'] = '%s: %s' % (type(e).__name__, msg[:300])
            BUGS[cname] = case


# ---- 1. schedulers with warm-up ------------------------------------------------------------------------
MOM = dict(momentum=0.9, wd=1e-3, eta=0.05)
scheds = {
    'factor_linear': ('FactorScheduler', dict(step=2, factor=0.5, base_lr=0.4, warmup_steps=3,
                                              warmup_begin_lr=0.05, warmup_mode='linear')),
    'factor_constant': ('FactorScheduler', dict(step=1, factor=0.7, base_lr=0.3, warmup_steps=2,
                                                warmup_begin_lr=0.1, warmup_mode='constant')),
    'factor_stop': ('FactorScheduler', dict(step=1, factor=0.5, base_lr=0.4, stop_factor_lr=0.06)),
    'multifactor_linear': ('MultiFactorScheduler', dict(step=[3, 4], factor=0.3, base_lr=0.5, warmup_steps=2,
                                                        warmup_begin_lr=0.02, warmup_mode='linear')),
    'multifactor_constant': ('MultiFactorScheduler', dict(step=[2, 5], factor=0.5, base_lr=0.3,
                                                          warmup_steps=2, warmup_begin_lr=0.05,
                                                          warmup_mode='constant')),
    'poly_linear': ('PolyScheduler', dict(max_update=5, base_lr=0.5, pwr=2, final_lr=0.01, warmup_steps=2,
                                          warmup_begin_lr=0.05, warmup_mode='linear')),
    'poly_pwr1_constant': ('PolyScheduler', dict(max_update=4, base_lr=0.3, pwr=1, final_lr=0.02,
                                                 warmup_steps=2, warmup_begin_lr=0.1, warmup_mode='constant')),
    'cosine_linear': ('CosineScheduler', dict(max_update=5, base_lr=0.5, final_lr=0.02, warmup_steps=2,
                                              warmup_begin_lr=0.0, warmup_mode='linear')),
    'cosine_constant': ('CosineScheduler', dict(max_update=4, base_lr=0.4, final_lr=0.0, warmup_steps=1,
                                                warmup_begin_lr=0.1, warmup_mode='constant')),
}
for i, (sn, (cls, args)) in enumerate(scheds.items()):
    sched = dict(cls=cls, args=args)
    add('sched/%s/lr_none' % sn, dict(MOM, learning_rate=None), sched=sched,
        paths=('fused_agg1', ('step', 'fused_agg4')[i % 2]))
    # LARS's default learning_rate=0.1 overwrites the scheduler's base_lr (spec B6); fused_agg1 is enough
    add('sched/%s/lr_default' % sn, dict(MOM), paths=('fused_agg1',), sched=sched)
add('sched/factor_linear/lr_explicit', dict(MOM, learning_rate=0.2), paths=('step',),
    sched=dict(cls='FactorScheduler', args=scheds['factor_linear'][1]))
add('sched/cosine_linear/lr_explicit', dict(MOM, learning_rate=0.25), paths=('fused_agg4',),
    sched=dict(cls='CosineScheduler', args=scheds['cosine_linear'][1]))
add('sched/poly_nomom/lr_none', dict(eta=0.1, wd=0.01, learning_rate=None),
    sched=dict(cls='PolyScheduler', args=dict(max_update=6, base_lr=0.5, pwr=3, final_lr=0.0)))

# ---- 2. begin_num_update ------------------------------------------------------------------------------
add('begin_num_update/factor', dict(MOM, learning_rate=None, begin_num_update=3),
    sched=dict(cls='FactorScheduler', args=dict(step=2, factor=0.5, base_lr=0.4, warmup_steps=5,
                                                warmup_begin_lr=0.05)))
add('begin_num_update/poly_past_max', dict(MOM, begin_num_update=10), paths=('fused_agg1',),
    sched=dict(cls='PolyScheduler', args=dict(max_update=5, base_lr=0.5, pwr=2, final_lr=0.01)))
add('begin_num_update/no_sched', dict(MOM, learning_rate=0.3, begin_num_update=7), paths=('fused_agg1',))

# ---- 3. lr / wd multipliers ----------------------------------------------------------------------------
MW = dict(momentum=0.9, wd=0.02, eta=0.1, learning_rate=0.3)
N3 = [[0, 'conv0_weight'], [1, 'dense0_weight'], [2, 'dense1_weight']]
add('mult/by_name', MW, names=N3,
    mult_calls=[['set_lr_mult', [['dense0_weight', 2.0], ['conv0_weight', 0.5]]],
                ['set_wd_mult', [['dense1_weight', 0.0], ['conv0_weight', 3.0]]]])
add('mult/by_index', MW, mult_calls=[['set_lr_mult', [[1, 0.25], [2, 1.5]]], ['set_wd_mult', [[0, 0.0], [2, 5.0]]]])
add('mult/param_dict', MW, param_dict=[[0, 0.5, 2.0], [2, 1.5, 0.0]])
add('mult/priority', MW, names=N3, param_dict=[[0, 0.5, 4.0]],
    mult_calls=[['set_lr_mult', [[0, 3.0], ['conv0_weight', 7.0], [1, 2.0], ['dense0_weight', 9.0],
                                 ['dense1_weight', 0.1]]],
                ['set_wd_mult', [[0, 0.0], ['conv0_weight', 0.0], [1, 3.0], ['dense0_weight', 0.0],
                                 ['dense1_weight', 2.0]]]])
add('mult/name_without_idx2name', MW, paths=('fused_agg1',),
    mult_calls=[['set_lr_mult', [['0', 5.0], ['dense0_weight', 5.0]]], ['set_wd_mult', [['1', 0.0]]]])
add('mult/set_twice_rebuilds', MW, paths=('fused_agg1', 'fused_agg4'),
    mult_calls=[['set_lr_mult', [[0, 4.0], [1, 4.0]]], ['set_lr_mult', [[2, 0.5]]],
                ['set_wd_mult', [[0, 9.0]]], ['set_wd_mult', [[1, 0.0]]]])
add('mult/nonzero_indices', MW, indices=[5, 2, 11], names=[[5, 'a_weight'], [2, 'b_bias'], [11, 'c_weight']],
    mult_calls=[['set_lr_mult', [[11, 2.0], ['a_weight', 0.5]]], ['set_wd_mult', [['b_bias', 0.0]]]])

# ---- 4. name exclusion with wd ------------------------------------------------------------------------
N7 = ['bn_beta', 'fc_weight', 'xbias', 'bn_gamma', 'omegamma', 'Bias', 'bias_w']
EX = dict(momentum=0.9, wd=0.01, eta=0.05, learning_rate=0.2)
add('names/exclusion_wd', EX, inputs='seven', names=[[i, n] for i, n in enumerate(N7)])
add('names/exclusion_nomom_wd_clip', dict(wd=0.05, eta=0.1, learning_rate=0.1, clip_gradient=0.3),
    inputs='seven', names=[[i, n] for i, n in enumerate(N7)])
add('names/partial_idx2name', EX, inputs='seven', paths=('fused_agg1', 'fused_agg4'),
    names=[[0, 'conv_weight'], [2, 'conv_bias'], [4, 'bn_gamma'], [9, 'unused_beta']])

# ---- 5. hyper-parameter variations --------------------------------------------------------------------
HP = {
    'mom0_plain': dict(learning_rate=0.5, eta=0.1),
    'mom0_wd_rescale': dict(learning_rate=0.5, eta=0.1, wd=0.01, rescale_grad=0.25),
    'mom09_rescale2_clip': dict(learning_rate=0.3, eta=0.1, momentum=0.9, rescale_grad=2.0, clip_gradient=0.5),
    'mom09_clip0_wd': dict(learning_rate=0.3, eta=0.1, momentum=0.9, wd=0.05, clip_gradient=0.0),
    'mom0_clip0': dict(learning_rate=0.3, eta=0.1, clip_gradient=0.0, wd=0.02),
    'mom05_eta_big': dict(learning_rate=0.1, eta=0.8, momentum=0.5, wd=1e-4),
    'mom09_eps_big': dict(learning_rate=0.5, eta=0.2, momentum=0.9, epsilon=0.5, wd=0.01),
    'mom09_eps0': dict(learning_rate=0.3, eta=0.1, momentum=0.9, epsilon=0.0, rescale_grad=0.1),
    'mom09_tight_clip_rescale': dict(learning_rate=0.2, eta=0.2, momentum=0.9, rescale_grad=8.0,
                                     clip_gradient=0.05, wd=0.005),
}
for hn, kw in HP.items():
    add('hparams/%s' % hn, kw, inputs='std3' if 'eps' not in hn else 'std3b')

# ---- 6. multi_precision fp16 ---------------------------------------------------------------------------
MP = dict(multi_precision=True, learning_rate=0.3, eta=0.1)
add('mp16/mom_wd', dict(MP, momentum=0.9, wd=0.01), inputs='fp16_4')
add('mp16/nomom_clip_rescale', dict(MP, clip_gradient=0.4, rescale_grad=0.5, wd=0.001), inputs='fp16_4')
# agg4 with names only where no excluded param precedes a LARS param inside a call (avoids spec B1)
add('mp16/names_excluded_last', dict(MP, momentum=0.9, wd=0.02), inputs='fp16_4',
    names=[[0, 'a_weight'], [1, 'b_weight'], [2, 'c_gamma'], [3, 'd_bias']])
add('mp16/names_excluded_first', dict(MP, momentum=0.9, wd=0.02), inputs='fp16_4',
    paths=('step', 'fused_agg1'), names=[[0, 'a_bias'], [1, 'b_weight'], [2, 'c_gamma'], [3, 'd_weight']])
add('mp16/sched_mults', dict(multi_precision=True, learning_rate=None, eta=0.1, momentum=0.9, wd=0.01),
    inputs='fp16_4', sched=dict(cls='CosineScheduler', args=dict(max_update=4, base_lr=0.4, final_lr=0.05,
                                                                 warmup_steps=1, warmup_begin_lr=0.1)),
    mult_calls=[['set_lr_mult', [[1, 2.0]]], ['set_wd_mult', [[3, 0.0]]]])

# ---- 7. fp16 without multi_precision ------------------------------------------------------------------
F16 = dict(learning_rate=0.5, eta=0.2)
add('fp16/mom_wd', dict(F16, momentum=0.9, wd=0.01), inputs='fp16_big')
add('fp16/nomom_rescale_clip', dict(F16, rescale_grad=0.5, clip_gradient=0.3), inputs='fp16_big')
add('fp16/tiny_updates_vanish', dict(learning_rate=0.1, eta=0.001, momentum=0.9), inputs='fp16_big',
    paths=('fused_agg1',))

# ---- 8. Updater ----------------------------------------------------------------------------------------
UP = dict(multi_precision=True, momentum=0.9, wd=0.01, eta=0.1, learning_rate=0.3)
NM = [[0, 'l0_weight'], [1, 'l1_weight'], [2, 'l2_weight'], [3, 'l3_weight'], [4, 'l4_weight'],
      [5, 'l5_bias'], [6, 'l6_beta']]
for pth in [('fused_agg1', {}), ('fused_agg4', {'aggregate_num': 4}), ('step_agg4', {'use_fused_step': False,
                                                                                      'aggregate_num': 4}),
            ('step_agg1', {'use_fused_step': False})]:
    add('updater/mixed_dtypes', UP, paths=(pth,), inputs='mixed7', driver='updater', names=NM)
add('updater/mixed_dtypes_nomom_sched', dict(multi_precision=True, wd=0.01, eta=0.1, learning_rate=None,
                                             clip_gradient=0.5),
    paths=(('fused_agg4', {'aggregate_num': 4}), ('fused_agg1', {})), inputs='mixed7', driver='updater',
    sched=dict(cls='FactorScheduler', args=dict(step=2, factor=0.5, base_lr=0.4, warmup_steps=2,
                                                warmup_begin_lr=0.1)))
# numpy.inf: one call for everything -- one dtype per run (multi_sum_sq needs one dtype per call)
add('updater/inf_fp32', dict(momentum=0.9, wd=0.01, eta=0.1, learning_rate=0.3), inputs='seven',
    driver='updater', paths=(('fused_agginf', {'aggregate_num': 'inf'}), ('step_agginf', {
        'use_fused_step': False, 'aggregate_num': 'inf'})), names=[[i, n] for i, n in enumerate(N7)])
add('updater/inf_fp16_mp', dict(UP), inputs='fp16_4', driver='updater',
    paths=(('fused_agginf', {'aggregate_num': 'inf'}),), names=[[0, 'a_weight'], [1, 'b_weight'], [3, 'd_bias']])
add('updater/agg4_fp16_nomp', dict(momentum=0.9, wd=0.01, eta=0.2, learning_rate=0.5), inputs='fp16_big',
    driver='updater', paths=(('fused_agg4', {'aggregate_num': 4}),))
# params join late and indices are not 0..n-1: lazy state creation, per-index counters, num_update = max
add('updater/partial_steps', dict(momentum=0.9, wd=0.01, eta=0.1, learning_rate=None, multi_precision=True),
    inputs='mixed7', driver='updater', indices=[10, 3, 7, 0, 12, 5, 1],
    active=[[0, 1, 2], [0, 1, 2, 3, 4], [3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 0]],
    sched=dict(cls='MultiFactorScheduler', args=dict(step=[2, 3], factor=0.5, base_lr=0.4, warmup_steps=1,
                                                     warmup_begin_lr=0.1)),
    paths=(('fused_agg1', {}), ('fused_agg4', {'aggregate_num': 4}), ('step_agg1', {'use_fused_step': False})))

# ---- 9. row_sparse gradients --------------------------------------------------------------------------
SP = dict(learning_rate=0.3, eta=0.1, wd=0.02)
for lazy in (True, False):
    for mom in (0.0, 0.9):
        add('sparse/lazy_%s_mom%s' % (lazy, mom), dict(SP, lazy_update=lazy, momentum=mom), inputs='sparse',
            paths=('fused_agg1',), sparse={'0': SPR[0], '1': SPR[1], '2': SPR[2]})
    # a call with a dense member and aggregate_num=4: the whole call falls back to the non-aggregated path
    add('sparse/lazy_%s_mixed_dense_agg4' % lazy, dict(SP, lazy_update=lazy, momentum=0.9, clip_gradient=0.2,
                                                       rescale_grad=2.0),
        inputs='sparse', paths=('fused_agg4',), sparse={'0': SPR[0], '2': SPR[2]},
        names=[[0, 'emb_weight'], [1, 'x_weight'], [2, 'emb_bias']])
add('sparse/standard_step_path', dict(SP, momentum=0.9), inputs='sparse', paths=('step',),
    sparse={'0': SPR[0], '1': SPR[1], '2': SPR[2]})
add('sparse/lazy_updater', dict(SP, lazy_update=True, momentum=0.9), inputs='sparse', driver='updater',
    paths=('fused_agg1',), sparse={'0': SPR[0], '1': SPR[1], '2': SPR[2]})

# ---- 10. MXNet bugs by design (recorded, never replayed) ----------------------------------------------
add('bug_B1/mp_agg_excluded_first_shapes_differ', dict(MP, momentum=0.9, wd=0.01), inputs='fp16_4',
    paths=('fused_agg4',), names=[[0, 'a_bias'], [1, 'b_weight']],
    bug='spec 8 B1: mp + aggregated + an excluded name before a LARS param pairs masters with wrong weights')
add('bug_B1/mp_agg_excluded_first_same_shape', dict(MP, momentum=0.9, wd=0.01), inputs='fp16_same',
    paths=('fused_agg4',), names=[[0, 'a_bias'], [1, 'b_weight']],
    bug='spec 8 B1: mp + aggregated + an excluded name before a LARS param pairs masters with wrong weights')
add('bug_B3/negative_rescale', dict(learning_rate=0.3, eta=0.1, rescale_grad=-0.5, momentum=0.9),
    paths=('fused_agg1', 'fused_agg4'), bug='spec 8 B3: agg path keeps the sign of rescale_grad in the norm')
add('bug_B3/zero_rescale', dict(learning_rate=0.3, eta=0.1, rescale_grad=0.0, wd=0.5),
    paths=('fused_agg1', 'fused_agg4'), bug='spec 8 B3: rescale_grad=0 falls back on one path only')
add('bug_mixed_dtype_inf', dict(UP), inputs='mixed7', driver='updater', names=NM,
    paths=(('fused_agginf', {'aggregate_num': 'inf'}),),
    bug='numpy.inf puts fp32 and fp16 in one aggregated call; multi_sum_sq needs one dtype')
add('bug_negative_momentum', dict(learning_rate=0.3, eta=0.1, momentum=-0.5), paths=('step', 'fused_agg1'),
    bug='spec 6 #4: momentum < 0 is used by step but dropped by fused_step (path-dependent)')

# --------------------------------------------------------------------------------------------- write


def _rel(a, b, init):
    a, b, init = (np.asarray(x, np.float64) for x in (a, b, init))
    return np.abs(a - b).max() / max(np.abs(b - init).max(), 1e-30)


def _path_agreement():
    """Informational: how far MXNet's own paths are from each other, in units of the test tolerance."""
    worst = 0.0
    by = {}
    for cname, c in CASES.items():
        by.setdefault(cname.split('@')[0], []).append(c)
    for base, cs in by.items():
        if len(cs) < 2 or any(d != 'float32' for d in INPUTS[cs[0]['inputs']]['dtypes']):
            continue
        init = INPUTS[cs[0]['inputs']]['w']
        for t in range(len(cs[0]['out']['weights'])):
            for p in range(len(init)):
                r = _rel(cs[1]['out']['weights'][t][p], cs[0]['out']['weights'][t][p], init[p]) / 1e-5
                worst = max(worst, r)
    return worst


def main(path):
    res = dict(mxnet_version=mx.__version__, format=1, inputs={}, cases=CASES, mxnet_bug=BUGS)
    for name, inp in INPUTS.items():
        res['inputs'][name] = dict(dtypes=inp['dtypes'],
                                   weights=[enc(w, inp['dtypes'][p]) for p, w in enumerate(inp['w'])],
                                   grads=[[enc(g, inp['dtypes'][p]) for p, g in enumerate(row)]
                                          for row in inp['g']])
    with open(path, 'w') as f:
        f.write('{\n')
        items = [('mxnet_version', res['mxnet_version']), ('format', 1)]
        for k, v in items:
            f.write('%s: %s,\n' % (json.dumps(k), json.dumps(v)))
        for sec in ('inputs', 'cases', 'mxnet_bug'):
            f.write('%s: {\n' % json.dumps(sec))
            keys = list(res[sec])
            for i, k in enumerate(keys):
                f.write('  %s: %s%s\n' % (json.dumps(k), json.dumps(res[sec][k], separators=(',', ':')),
                                          ',' if i < len(keys) - 1 else ''))
            f.write('}%s\n' % (',' if sec != 'mxnet_bug' else ''))
        f.write('}\n')
    print('wrote %s: %d cases, %d mxnet_bug records' % (path, len(CASES), len(BUGS)))
    print('MXNet step/fused path spread, fp32 cases: %.3g of the 1e-5 tolerance' % _path_agreement())


if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else 'golden_mxnet_extra.json')
