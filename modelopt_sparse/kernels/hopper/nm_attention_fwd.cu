// N:M sparse softmax attention, forward, for Hopper (sm_90a): one warp-specialized CTA per
// 128-query tile of one (sequence, query head).
//
//   warpgroup 0 (producer, 128 threads, registers lowered by setmaxnreg): loads Q once and the
//     K/V tiles of 128 keys into a ring of shared-memory stages with cp.async (zero-filling rows
//     past the sequence), and signals "full" mbarriers; K and V have separate barriers so that
//     a K stage is refilled as soon as Q.K^T has read it.
//   warpgroups 1 and 2 (consumers, registers raised): 64 query rows each. Per key tile:
//     S = Q.K^T (wgmma, SS), the N:M selection on the f32 accumulator fragment, online softmax
//     in registers, O += P.V (wgmma, RS: P converted to 16-bit in registers). Q.K^T of tile j
//     is issued together with P.V of tile j-1 so that the softmax of j runs under P.V(j-1)
//     (intra-warpgroup overlap); with NMH_PINGPONG the two warpgroups also take turns issuing
//     their MMAs (named barriers) so that one's softmax runs under the other's MMAs.
//
// The rule is docs/semantics.md, element for element. The kernel's key tiles hold keys in a
// permuted order when N:M selection is on: shared-memory row c of a tile starting at key n0
// holds key n0 + (c % G) * M + c / G (G = 128 / M), for K and V alike (so P.V is unchanged).
// In the wgmma accumulator layout thread (warp w, lane 4g+t) holds columns 8j + 2t + e
// (j < 16, e < 2) of rows g and g+8; with the permutation the M members of a group are the
// columns j = jr + R*m (R = 16 / M, m = member = key order), all in one thread: selection
// needs no shuffle at all.
//
// Compile-time variant (-D): NMH_HEAD_DIM (64, 128), NMH_SPARSITY_N / NMH_SPARSITY_M (N = 0:
// dense), NMH_TIE_INDEX, NMH_FP16 (else bf16), NMH_PINGPONG, NMH_OVERLAP (intra-warpgroup
// overlap: the softmax of tile j runs while P.V(j-1) is in flight; costs the 32 registers of
// P(j-1) during the softmax), NMH_PROBE (mask-probe build: also writes the raw scores and the
// kept flags; the same selection code, for tests only).
// Variants added 2026-12-02 after the first H200 run (compile-checked only, not yet run on a
// GPU): NMH_LATE_RESCALE (FA3's order: O is rescaled by the previous tile's factor after
// Q.K^T(i) is issued and before P.V(i-1) is issued, so the 64 FMULs run under the MMA instead
// of between the last wait and the next issue), NMH_TMA (the producer is one thread issuing TMA
// box loads instead of 128 threads issuing cp.async; dense, and N:M with M <= 8 through an
// element-strided box per group member), NMH_SASS_INTERIOR (instruction counting only: every
// tile is treated as interior so that the loop body in the SASS is the interior path),
// NMH_LEAN (FlashAttention-4's conditional rescale: the running max is only moved when a tile's
// max exceeds it by more than 8 in log2 units, so most tiles skip the 64 FMULs of the O rescale
// and its two ex2; P is then at most 2^8, harmless in f32 sums and in bf16/fp16 P; plus the
// two-instruction kept test drop_below2), NMH_CONSUMERS = 3 (D = 64 only: three consumer
// warpgroups, 192 query rows per CTA, FA3's D = 64 shape: while one warpgroup runs its softmax
// the other two keep the tensor cores busy, which two cannot at D = 64, where a tile's softmax
// takes longer than the other warpgroup's MMAs; ping-pong becomes a ring of three turns),
// NMH_SPARSE_PV (issue 15 stage 3, 2:4 only: P.V through wgmma.sp with P as the
// compressed sparse A operand; V is loaded in a second row order, see v_row_key, by cp.async or,
// with NMH_TMA, through a 5-D map that writes that order, see struct TmaParams; tiles
// that keep more than 2 of a group (edge tiles, ties) run P.V as two sparse MMAs per 32 keys
// with fixed metadata, members {0, 1} and {2, 3}, on the same V layout), NMH_TMA3D (with
// NMH_TMA and N:M, used for M = 16: the K / V maps express the group permutation through a 4-D
// view {head_dim, heads, group, member} instead of element strides, see struct TmaParams).
// NMH_MID_WAIT (session 16; with NMH_OVERLAP, dense P.V): the wait for P.V(j-1) moves from after
// the softmax of tile j into it, after its first MID_WAIT_AFTER exponentials, and P(j) is
// converted into the A operand as its exponentials come out, between the remaining MUFUs,
// instead of in a block of conversions between that wait and the next issue (FlashAttention-4's
// sm90 order at D = 64, seen in its SASS under Nsight Compute); NMH_PRODUCER_SUSPENDS (session
// 16, A/B only: the producer's waits for free stages suspend between polls). NMH_MMA_ROWSUM
// (session 18; dense P.V): the row sums of P come from the tensor core instead of 64 FADDs per
// thread and tile: every V stage is followed by a swizzle atom of ones, and P.V runs as
// m64n(D+8)k16, whose last 8 accumulator columns are the running row sum l (rescaled with O).
// l then sums P as the MMA reads it (rounded to 16 bits, as the output's numerator does).
// NMH_BN64 (session 18, D = 128, TMA producer, dense or M <= 8): tiles of 64 keys and three
// consumer warpgroups (192 query rows per CTA, as D = 64): with half the score registers per
// thread, three warpgroups fit in 160 registers each, so that one warpgroup's softmax and
// selection run under the MMAs of two others instead of one. Measured slower on the H200
// (dense 0.925x, 2:4 0.909x, 4:8 0.76-0.78x): the per-tile work that does not shrink with the
// tile outweighs the overlap; an A/B switch only. NMH_PAIRWISE (session 18, M = 16): the
// selection network is Parberry's pairwise sorting network (networks.cuh) instead of Batcher's:
// the same ranks (any sorting network gives the same sorted values, so the kept set and the
// outputs are bit for bit the same) from 88 instead of 92 FMNMX per group.
// NMH_ROW_PIPE (session 21, N:M, threshold rule): interior tiles select, exponentiate and sum
// row by row (a thread holds two rows) instead of all networks first and all exponentials
// after, so that ptxas can run the second row's selection network (ALU pipe) under the first
// row's kept tests and exponentials (FMA pipe, MUFU): the same instructions, overlapped.
// NMH_HALF_SELECT (session 21, M = 16): interior tiles run the selection network on f16 copies
// of the scores, two groups per register (HMNMX2: two comparisons for the issue cost of one
// FMNMX), and turn the result into an exact f32 threshold; a thread with a group its f16 copies
// cannot decide runs the f32 network for its groups (of the row, under NMH_ROW_PIPE). See
// half_select_group.
// NMH_KV_PRETEST (session 23): a consumer tests, right after the softmax of tile i, whether K(i+1)
// and V(i) have arrived (mbarrier.test_wait, non-blocking; the next step votes on the result, so
// that its latency runs under the rest of the step), and the next step skips its two blocking
// waits when they had: a wait on a completed phase still costs ~100 cycles at the step's start
// (the `phases` command measured 100-190 per wait). The same acquire (test_wait is .acquire), and
// no parity ambiguity: the stage's previous phase was consumed by an earlier step. On by default
// where it paid (measured_kv_pretest: 1-2 %; 0.96x at D = 128 4:8, which keeps the waits).
// NMH_PHASE_CLOCKS (session 23, measurement only): lane 0 of each consumer warpgroup's first warp
// writes SM clock stamps at the phase boundaries of each tile step (listed at CLOCK_STAMPS) into
// p.probe_s, read as uint32 [CTA][consumer warpgroup][tile < CLOCK_TILES][CLOCK_STAMPS]; the
// `phases` command (hopper_attention/phases.py) turns them into cycles per phase.
#include "networks.cuh"
#include "ptx.cuh"
#include "wgmma.cuh"

#ifndef NMH_HEAD_DIM
#define NMH_HEAD_DIM 128
#endif
#ifndef NMH_SPARSITY_N
#define NMH_SPARSITY_N 0
#endif
#ifndef NMH_SPARSITY_M
#define NMH_SPARSITY_M 4
#endif
#ifndef NMH_TIE_INDEX
#define NMH_TIE_INDEX 0
#endif
#ifndef NMH_FP16
#define NMH_FP16 0
#endif
#ifndef NMH_PINGPONG
#define NMH_PINGPONG 0
#endif
#ifndef NMH_OVERLAP
#define NMH_OVERLAP 1
#endif
#ifndef NMH_PROBE
#define NMH_PROBE 0
#endif
#ifndef NMH_LATE_RESCALE
#define NMH_LATE_RESCALE 0
#endif
#ifndef NMH_TMA
#define NMH_TMA 0
#endif
#ifndef NMH_TMA3D
#define NMH_TMA3D 0
#endif
#ifndef NMH_CONSUMERS
#define NMH_CONSUMERS 2
#endif
#ifndef NMH_LEAN
#define NMH_LEAN 0
#endif
#ifndef NMH_SPARSE_PV
#define NMH_SPARSE_PV 0
#endif
#ifndef NMH_SASS_INTERIOR
#define NMH_SASS_INTERIOR 0
#endif
#ifndef NMH_SPLIT_LOOP
#define NMH_SPLIT_LOOP 0
#endif
#ifndef NMH_MID_WAIT
#define NMH_MID_WAIT 0
#endif
#ifndef NMH_PRODUCER_SUSPENDS
#define NMH_PRODUCER_SUSPENDS 0
#endif
#ifndef NMH_MMA_ROWSUM
#define NMH_MMA_ROWSUM 0
#endif
#ifndef NMH_BN64
#define NMH_BN64 0
#endif
#ifndef NMH_PAIRWISE
#define NMH_PAIRWISE 0
#endif
#ifndef NMH_HALF_SELECT
#define NMH_HALF_SELECT 0
#endif
#ifndef NMH_ROW_PIPE
#define NMH_ROW_PIPE 0
#endif
#ifndef NMH_PHASE_CLOCKS
#define NMH_PHASE_CLOCKS 0
#endif
#ifndef NMH_KV_PRETEST
#define NMH_KV_PRETEST 0
#endif
#ifndef NMH_LEARNED_SINKS
#define NMH_LEARNED_SINKS 0
#endif
// Producers whose K / V maps cannot bound every tile by themselves (the grouped maps, stage 3's V
// map): TmaParams carries the rows of K and V, and the tiles near the tensor's end go by cp.async.
#define NMH_TMA_BOUNDED (NMH_TMA3D || (NMH_SPARSE_PV && NMH_TMA))

using namespace nmh;

// Kernel arguments, one struct by value. hopper_attention/driver.py mirrors it field for field
// (ctypes) and checks sizeof against nmh_config[3] at load time.
struct FwdParams {
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
  uint16_t* o;
  float* lse;              // [rows, lse_row] log2-domain log-sum-exp (the Triton backward's input)
  const int* q_start;      // varlen metadata, int32 [B]
  const int* q_len;
  const int* k_start;
  const int* k_len;
  float* probe_s;          // mask probe (NMH_PROBE builds): raw scores and kept flags,
  uint8_t* probe_kept;     //   [Hq, rows, probe_keys]
  int64_t q_row, q_head;   // strides in elements (unit stride along the head dim)
  int64_t k_row, k_head;
  int64_t v_row, v_head;
  int64_t o_row, o_head;
  int64_t probe_head, probe_row;
  int groups;              // Hq / Hkv
  int lse_row;             // lse row stride (= Hq)
  int is_causal;
  int num_sink;
  int dense_window;
  int sliding_window;      // 0 = off
  int reserved;
  float scale_log2;        // softmax_scale * log2(e)
  const float* sinks;      // NMH_LEARNED_SINKS: fp32 [Hq] in natural-log units (else unread); last,
                           // so that the fields before it keep their offsets (session 24)
};
static_assert(sizeof(FwdParams) == 208, "FwdParams layout changed: update hopper_attention/driver.py");

// TMA variants only: a second kernel argument with the three tensor maps (CUtensorMap, 128
// opaque bytes each, encoded on the host by cuTensorMapEncodeTiled; hopper_attention/driver.py,
// _Driver.encode_tma). Each map views a tensor as 3-D {head_dim, heads, rows} with a box of
// {64 elements (128 B, one swizzle atom column), 1 head, 128 rows}; the K and V maps of an N:M
// variant step M rows at a time (element stride M: one box = the G rows of one group member).
// The default variants keep their one-argument signature (FwdParams unchanged).
// NMH_TMA3D (N:M, any M, used for M = 16): the K and V maps express the group permutation
// through dimensions instead of element strides: 4-D {head_dim, heads, g, m} with g's global
// stride M rows and m's one row, box {64, 1, 128/M, M}, all element strides 1. TMA fills shared
// memory innermost dimension first, so box element (g, m) lands in smem row g + (128/M) m, which
// holds key M g + m: the group-permuted tile in one box per atom column. The tile's first key
// row0 = M g0 + r is addressed as (g, m) = (g0, r) (m's extent is 2M - 1). TMA bounds each
// coordinate separately, not the row M g + m, so the g extent stops M to 2M - 1 rows short of
// the tensor's end (no read past it); the at most two tiles that reach into those last rows
// (always the first ones a CTA visits) are loaded by the four producer warps with cp.async.
// NMH_SPARSE_PV with NMH_TMA: K as the N:M map above (element stride 4); V through a 5-D view
// {head_dim, heads, d, c, b} with strides 1, 8 and 4 rows, box {64, 1, 4, 4, 2}: box element
// (d, c, b) at start row r0 holds row r0 + d + 8 c + 4 b and lands in smem row d + 4 c + 16 b, so
// four boxes per atom column (r0 = row0 + 32 a, at smem row 32 a) write exactly v_row_key's order.
// d's extent is rows - 31 (no in-bounds coordinate reads past the last row); a tile whose last
// box would cross it (row0 + 131 > rows: tiles 0 and 1 at most, as above) goes by cp.async.
struct alignas(64) TmaMap {
  uint64_t opaque[16];
};
struct TmaParams {
  TmaMap q, k, v;
#if NMH_TMA_BOUNDED
  int64_t kv_rows;  // rows of the packed K and V tensors (the maps' bound; see the producer)
#endif
};

constexpr int D = NMH_HEAD_DIM;
constexpr int N_SEL = NMH_SPARSITY_N;
constexpr int M_SEL = NMH_SPARSITY_M;
constexpr bool SPARSE = N_SEL > 0;
constexpr bool TIE_INDEX = NMH_TIE_INDEX != 0;
constexpr bool FP16 = NMH_FP16 != 0;
constexpr bool PINGPONG = NMH_PINGPONG != 0;
constexpr bool OVERLAP = NMH_OVERLAP != 0;
constexpr bool PROBE = NMH_PROBE != 0;
constexpr bool LATE_RESCALE = NMH_LATE_RESCALE != 0;
constexpr bool TMA = NMH_TMA != 0;
constexpr bool TMA3D = NMH_TMA3D != 0;
constexpr bool SASS_INTERIOR = NMH_SASS_INTERIOR != 0;
constexpr bool LEAN = NMH_LEAN != 0;
constexpr float LEAN_SLACK = 8.f;  // log2 units: P <= 2^8 between rescales
constexpr bool SPARSE_PV = NMH_SPARSE_PV != 0;
// The tile loop as two loops, one over runs of edge tiles and one over runs of interior tiles
// (session 13; session 14: within noise of one loop, off): the interior loop's body holds no per-element test, so
// the values only the edge path reads need no registers there. With the edge path in the same
// body, the D = 64 three-warpgroup overlap variants spill 144 B, inside the loop; built with
// the interior path alone (NMH_SASS_INTERIOR) they spill nothing.
constexpr bool SPLIT_LOOP = NMH_SPLIT_LOOP != 0;
// P.V(j-1) is waited for inside the softmax of tile j, after this many of its 64
// exponentials (two k16 slices of P): by then the MMA has normally finished (it was issued just
// before the softmax began, behind Q.K^T(j)), and the rest of the exponentials leave the MUFU
// gaps in which the conversions of P(j) into the operand registers run.
constexpr bool MID_WAIT = NMH_MID_WAIT != 0;
constexpr int MID_WAIT_AFTER = 16;
static_assert(!MID_WAIT || (NMH_OVERLAP && !NMH_SPARSE_PV), "NMH_MID_WAIT: the overlapped schedule, dense P.V");
// NMH_PRODUCER_SUSPENDS (session 16, A/B only): the producer's waits for free stages suspend
// the waiting thread (try_wait with a time hint, NANOSLEEP.SYNCS in the SASS) instead of polling
// in a tight loop. Under Nsight Compute the polling loop issued 16 M instructions of 285 M at
// D = 64, on the scheduler of one consumer warp per warpgroup (FlashAttention-4's producer
// sleeps); yet suspending measured 0.986-0.997x of polling at D = 128 and 1.009x at D = 64 on
// the H200, so polling stays the default.
constexpr bool SUSPEND_PRODUCER = NMH_PRODUCER_SUSPENDS != 0;
// The row sums of P by the tensor core (see the header): l lives in O's last accumulator
// registers, o[D / 2 + 2r] for row g + 8r (all eight extra columns hold the same sum), so the
// softmax issues no FADD for it and the epilogue needs no quad reduction; O's rescale scales
// it with O, as the softmax scaled l before. The sparse P.V (wgmma.sp) keeps the FADDs.
constexpr bool MMA_ROWSUM = NMH_MMA_ROWSUM != 0;
static_assert(!MMA_ROWSUM || !NMH_SPARSE_PV, "NMH_MMA_ROWSUM: dense P.V only");
constexpr int O_ACC = D / 2 + (MMA_ROWSUM ? 4 : 0);  // O's accumulator registers per thread
// Which softmax path a loop body runs: decided per tile at run time, or fixed by the loop.
template <int K>
struct TileKind {
  static constexpr int value = K;
};
using AnyTile = TileKind<0>;
using EdgeTile = TileKind<1>;
using InteriorTile = TileKind<2>;
// The softmax writes the compressed P into staging registers (cp, cm), which to_operand moves
// into the operand registers after the wait that frees P(j-1)'s: with overlap that P.V is still
// in flight during the softmax (without, ptxas coalesces the two sets and the moves vanish).
// The probe build checks the dense path only.
static_assert(!SPARSE_PV || (NMH_SPARSITY_N == 2 && NMH_SPARSITY_M == 4 && !NMH_PROBE && NMH_CONSUMERS == 2),
              "sparse P.V: 2:4, no probe, two consumer warpgroups");
// TMA's element stride is at most 8, so M = 16 keeps the cp.async producer (the host never
// builds that combination: Variant.canonical()).
static_assert(!TMA || TMA3D || !(NMH_SPARSITY_N > 0 && NMH_SPARSITY_M > 8), "TMA with N:M needs M <= 8");
// The grouped (dimension-permuted) maps: N:M only, with the TMA producer, two consumer warpgroups.
static_assert(!TMA3D || (TMA && NMH_SPARSITY_N > 0 && NMH_CONSUMERS == 2 && !NMH_SPARSE_PV),
              "NMH_TMA3D: N:M with NMH_TMA, two consumer warpgroups");
static_assert(D == 64 || D == 128, "head dim 64 or 128");
static_assert(!SPARSE || M_SEL == 2 || M_SEL == 4 || M_SEL == 8 || M_SEL == 16, "M in 2/4/8/16");
static_assert(N_SEL >= 0 && N_SEL < M_SEL, "0 <= N < M");

constexpr int NC = NMH_CONSUMERS;        // consumer warpgroups, 64 query rows each
constexpr bool BN64 = NMH_BN64 != 0;
static_assert(NC == 2 || (NC == 3 && (D == 64 || BN64)), "three consumer warpgroups only at D = 64 or with NMH_BN64");
static_assert(!BN64 || (D == 128 && NC == 3 && TMA && !TMA3D && !SPARSE_PV && (!SPARSE || M_SEL <= 8)),
              "NMH_BN64: D = 128, three consumer warpgroups, the TMA producer, dense or M <= 8");
constexpr int BM = 64 * NC;             // query rows per CTA
constexpr int BN = BN64 ? 64 : 128;     // keys per tile
constexpr int SC = BN / 2;              // score accumulators per thread (m64nBN)
constexpr int KSTEPS = BN / 16;         // k16 steps of P.V (P's operand slices)
constexpr int THREADS = 128 * (NC + 1);
constexpr int STAGES = D == 128 && !BN64 ? 2 : 4;
constexpr int ATOM_BYTES = BN * 128;    // a K / V swizzle atom column: BN rows x 128 B (64 elements)
constexpr int Q_ATOM_BYTES = BM * 128;  // Q's: BM rows x 128 B
constexpr int TILE_BYTES = (D / 64) * ATOM_BYTES;
constexpr int Q_BYTES = (D / 64) * BM * 128;  // = TILE_BYTES with two consumers (D = 64 if three)
constexpr int Q_OFF = 0;
constexpr int K_OFF = Q_OFF + Q_BYTES;
// NMH_MMA_ROWSUM: each V stage is followed by one swizzle atom column of ones (the B columns
// D..D+7 of P.V: the MN-major operand's atoms along N are ATOM_BYTES apart).
constexpr int V_STAGE_BYTES = TILE_BYTES + (MMA_ROWSUM ? ATOM_BYTES : 0);
constexpr int V_OFF = K_OFF + STAGES * TILE_BYTES;
constexpr int BAR_OFF = V_OFF + STAGES * V_STAGE_BYTES;
constexpr int BAR_Q = 0, BAR_FULL_K = 1, BAR_FULL_V = 1 + STAGES, BAR_EMPTY_K = 1 + 2 * STAGES,
              BAR_EMPTY_V = 1 + 3 * STAGES, NUM_BARS = 1 + 4 * STAGES;
constexpr int SMEM_BYTES = BAR_OFF + 8 * NUM_BARS + 1024;  // + slack to align the base to 1024
// 128*40 + 256*232 = 384*168 (cp.async: the producer computes 128 addresses a tile). The TMA
// producer is one thread with a few scalars: 24, and the consumers get FA3's 240.
// Three consumers (512 threads, 128 registers each at launch): 24/160 (TMA) or 40/152.
constexpr int LAUNCH_REGS = (65536 / THREADS) & ~7;
constexpr int PRODUCER_REGS = TMA ? 24 : 40;
constexpr int CONSUMER_REGS = NC == 2 ? (TMA ? 240 : 232) : (TMA ? 160 : 152);
static_assert(128 * PRODUCER_REGS + 128 * NC * CONSUMER_REGS <= THREADS * LAUNCH_REGS, "register pool");

constexpr int PRODUCER_WARPS = 4, CONSUMER_WARPS = 4 * NC;
// Full barriers: one arrival per producer warp (cp.async) or the single expect_tx (TMA).
constexpr int FULL_ARRIVALS = TMA ? 1 : PRODUCER_WARPS;

// Read by the host (cuModuleGetGlobal): dynamic shared memory, threads, query rows per CTA,
// sizeof(FwdParams), keys per tile (the K / V maps' box rows).
extern "C" __constant__ int nmh_config[5] = {SMEM_BYTES, THREADS, BM, (int)sizeof(FwdParams), BN};

// Key permutation (see the header). G groups per tile row; R column residues per group.
constexpr int G_PERM = SPARSE ? BN / M_SEL : BN;
constexpr int R_PERM = SPARSE ? (BN / 8) / M_SEL : BN / 8;
__device__ __forceinline__ int row_key(int c) {  // shared-memory row -> key offset in the tile
  if constexpr (SPARSE) return (c % G_PERM) * M_SEL + c / G_PERM;
  else return c;
}
__device__ __forceinline__ int col_key(int j, int t, int e) {  // accumulator column -> key offset
  if constexpr (SPARSE) return M_SEL * (8 * (j % R_PERM) + 2 * t + e) + j / R_PERM;
  else return 8 * j + 2 * t + e;
}

// ---------------------------------------------------------------------------------------------
// Producer: 128 rows of one tile with cp.async, 16 bytes a thread per instruction. Thread tid
// copies chunk cc = tid % CPR of rows rb + ROW_STEP * i; the 128-byte swizzle XORs the chunk
// index with row % 8, which is rb % 8 for all of a thread's rows.
// ---------------------------------------------------------------------------------------------
// NMH_SPARSE_PV's V order: within every 32 keys, smem row r holds key 8 * ((r % 16) / 4) +
// 4 * ((r % 32) / 16) + r % 4. With K group-permuted (M = 4), thread t's group (jr, e) holds keys
// 32 jr + 8 t + 4 e + m (member m); it becomes k-slice jr, chunk t (e = 0) or 4 + t (e = 1) of
// the sparse A fragment, whose logical k = 16 e + 4 t + m must meet V row 32 jr + 16 e + 4 t + m.
__device__ __forceinline__ int v_row_key(int c) {
  return (c / 32) * 32 + 8 * ((c % 16) / 4) + 4 * ((c % 32) / 16) + c % 4;
}
template <bool PERM, int ROWS = 128, bool VPERM = false>
__device__ __forceinline__ void load_tile(uint32_t dst, const uint16_t* base, int64_t row_stride, int n0,
                                          int limit, int tid) {
  constexpr int CPR = D / 8;
  constexpr int ROW_STEP = 128 / CPR;
  static_assert(ROWS == 128 || D == 64, "a tile of other than 128 rows only in one atom column");
  const int cc = tid % CPR, rb = tid / CPR;
  const uint32_t col = (uint32_t)((cc / 8) * ATOM_BYTES + (((cc % 8) ^ (rb & 7)) << 4));
  const uint16_t* src0 = base + cc * 8;
  // Partly unrolled: the producer runs on few registers (setmaxnreg) and is not issue-bound.
#pragma unroll 4
  for (int i = 0; i < ROWS / ROW_STEP; ++i) {
    const int c = rb + ROW_STEP * i;
    const int key = n0 + (VPERM ? v_row_key(c) : PERM ? row_key(c) : c);
    const bool valid = key < limit;
    const uint16_t* src = src0 + (int64_t)(valid ? key : 0) * row_stride;
    cp_async16(dst + col + (uint32_t)c * 128u, src, valid ? 16u : 0u);
  }
}

// What a consumer thread knows about its rows that is not a kernel argument (arguments stay
// in the constant bank and cost no register).
struct RowCtx {
  int q_len, kv_len, p_lo, p_hi;
  int qrow;         // sequence row of the thread's first row (the second is qrow + 8)
  int offset;       // kv_len - q_len: key-space position = row + offset
};

__device__ __forceinline__ bool tile_is_edge(int n0, const RowCtx& x, const FwdParams& p) {
  if constexpr (SASS_INTERIOR) return false;  // instruction counting only (never launched)
  bool e = n0 + BN > x.kv_len;
  if (p.is_causal) e |= n0 + BN - 1 > x.p_lo;
  if (p.sliding_window > 0) e |= x.p_hi - n0 >= p.sliding_window;
  if constexpr (SPARSE) {
    e |= x.q_len == 1;  // decode: dense, no selection
    e |= n0 < p.num_sink;
    if (p.dense_window > 0) e |= (n0 <= x.p_hi) && (n0 + BN - 1 >= x.p_lo - p.dense_window + 1);
  }
  return e;
}

// The keys a row may attend to, relative to kbase (the key of the thread's column 0 in the
// tile): entry col = col_key(j, 0, e) is allowed iff before < col <= last. Not yet visible keys
// (past kv_len), the causal future and keys older than the sliding window are the rules of
// docs/semantics.md; a row past the sequence (pos beyond kv_len) is cut by kv_len as before.
struct KeyWindow {
  int last, before;
};
__device__ __forceinline__ KeyWindow key_window(int pos, int kbase, const RowCtx& x, const FwdParams& p) {
  int last = x.kv_len - 1;
  if (p.is_causal) last = min(last, pos);
  // pos - window excludes the keys with pos - key >= window; keys are >= 0, so -1 excludes
  // nothing (the min keeps a huge window from overflowing the subtraction).
  const int before = p.sliding_window > 0 ? pos - min(p.sliding_window, pos + 1) : -1;
  return {last - kbase, before - kbase};
}
// N:M's dense region of a row, relative to kbase like KeyWindow: the sinks (col < sinks_end), the
// dense window (window_before < col <= window_last: 0 <= pos - key < dense_window) and, for a
// decode step (q_len == 1), every key.
struct DenseRegion {
  int sinks_end, window_before, window_last;
};
__device__ __forceinline__ DenseRegion dense_region(int pos, int kbase, const RowCtx& x, const FwdParams& p) {
  const int sinks_end = x.q_len == 1 ? 1 << 30 : p.num_sink - kbase;  // decode: col <= 127 always
  // dense_window (>= 0, checked on the host) = 0: an empty interval (before = last); the min
  // keeps a huge window from overflowing (keys are >= 0, so before = -1 excludes nothing).
  return {sinks_end, pos - min(p.dense_window, pos + 1) - kbase, pos - kbase};
}

// Descending Batcher odd-even merge sort network on M values, written as template recursion so
// that every index is a compile-time constant (a runtime index would put the array in local
// memory). The compiler drops every comparator outside the cone of the ranks that are used.
// The comparators (cx, on float or on F16x2) are in networks.cuh.
// Merge the sorted halves of x[LO, LO + N) looking at every R-th element (Batcher's recursion).
template <int LO, int N, int R, int M, class T>
__device__ __forceinline__ void oe_merge(T (&x)[M]) {
  constexpr int STEP = 2 * R;
  if constexpr (STEP < N) {
    oe_merge<LO, N, STEP>(x);
    oe_merge<LO + R, N, STEP>(x);
#pragma unroll
    for (int i = LO + R; i + R < LO + N; i += STEP) cx(x[i], x[i + R]);
  } else {
    cx(x[LO], x[LO + R]);
  }
}
template <int LO, int N, int M, class T>
__device__ __forceinline__ void oe_sort(T (&x)[M]) {
  if constexpr (N > 1) {
    oe_sort<LO, N / 2>(x);
    oe_sort<LO + N / 2, N / 2>(x);
    oe_merge<LO, N, 1>(x);
  }
}
template <int M, class T>
__device__ __forceinline__ void sort_desc(T (&x)[M]) {
  if constexpr (NMH_PAIRWISE != 0 && M == 16) pairwise_sort16_desc(x);
  else oe_sort<0, M>(x);
}

constexpr int NGROUPS = SPARSE ? (BN / 4) / M_SEL : 1;  // groups per thread row
// Two groups per f16 network: M = 16 only (counted for 4:8 and 2:4 from the SASS: their networks
// are too small to pay for the conversions and the per-group floors).
constexpr bool HALF_SELECT = NMH_HALF_SELECT != 0 && SPARSE && M_SEL == 16 && NGROUPS % 2 == 0;
static_assert(NMH_HALF_SELECT == 0 || HALF_SELECT, "NMH_HALF_SELECT: M = 16 with 128-key tiles");
constexpr bool ROW_PIPE = NMH_ROW_PIPE != 0;
static_assert(!ROW_PIPE || (SPARSE && !TIE_INDEX && !NMH_SPARSE_PV), "NMH_ROW_PIPE: N:M, threshold rule, dense P.V");
// NMH_PHASE_CLOCKS: stamps per tile step, in this order: 0 the step's start, 1 K(i) and V(i-1)
// arrived, 2 the ping-pong turn taken, 3 Q.K^T(i) and P.V(i-1) issued, 4 Q.K^T(i) waited for
// (and, without overlap, P.V(i-1)), 5 the softmax done (with MID_WAIT it holds the wait for
// P.V(i-1)), 6 the step's end (the wait for P.V(i-1) with overlap and no MID_WAIT, O's rescale,
// P into the operand registers), 7 between 0 and 1: K(i) arrived (V(i-1) not yet waited for).
// Stamps are (clock | 1), so 0 means "not recorded".
constexpr bool PHASE_CLOCKS = NMH_PHASE_CLOCKS != 0;
constexpr bool KV_PRETEST = NMH_KV_PRETEST != 0;
constexpr bool LEARNED_SINKS = NMH_LEARNED_SINKS != 0;  // the epilogue folds in p.sinks[head]
constexpr int CLOCK_TILES = 128, CLOCK_STAMPS = 8;
static_assert(!PHASE_CLOCKS || !PROBE, "NMH_PHASE_CLOCKS writes where the mask probe would");
__device__ __forceinline__ int member_index(int g, int m, int r) {  // g = jr * 2 + e
  return 4 * ((g >> 1) + R_PERM * m) + 2 * r + (g & 1);
}

// Softmax of one tile: selection, running max, exponentials in place (s becomes P in f32),
// running sum, and the factor alpha by which O must be rescaled.
// Returns whether O must be rescaled by alpha (always, unless NMH_LEAN; warp-uniform).
// NMH_SPARSE_PV: all 128 threads of the calling warpgroup vote (bar.red.or on barrier 3 + c):
// true if any thread's flag is true. wgmma is warpgroup-wide, so the sparse/dense P.V choice
// must be the same in all four warps.
__device__ __forceinline__ bool warpgroup_any(bool flag) {
  const int id = 3 + (int)(threadIdx.x / 128) - 1;
  uint32_t out;
  asm volatile(
      "{\n.reg .pred q, r;\n"
      "setp.ne.u32 q, %1, 0;\n"
      "bar.red.or.pred r, %2, 128, q;\n"
      "selp.u32 %0, 1, 0, r;\n}\n"
      : "=r"(out)
      : "r"((uint32_t)flag), "r"(id)
      : "memory");
  return out != 0;
}

// NMH_HALF_SELECT: the kept set of one group from its f16 network's outputs (rank 0 `top`, rank
// N-1 `tn`, rank N `tn1`, as floats; `odd_step`: 1.5 * 2^-24 if tn's last significand bit is 1,
// else 0). Rounding to f16 is monotone, so the f16 network's ranks are the f16 roundings of the
// f32 ranks. If tn1 < tn, the N-th and (N+1)-th largest scores round apart: exactly the scores
// that round to >= tn are the N largest, and they are the scores >= the smallest f32 that rounds
// to >= tn. That floor is theta = (tn + tn1) / 2 when tn and tn1 are adjacent f16 values (their
// sum is exact in f32; theta is the rounding boundary, which ties-to-even gives to tn if tn is
// even, else to tn1: then the next f32 up, theta + 0.75 to 1.5 ulp in one fma, which rounds to
// exactly one ulp because such a theta is never a power of two); when they are not adjacent, f32
// rounding keeps theta (and one or two ulps above it) strictly between tn1's upper and tn's lower
// boundary, so the same floor is safe. Returns false (the caller runs the f32 network) when the
// f16 copy cannot decide: tn1 == tn (an f16 collision, which is also how f16 underflow shows,
// or an f32 tie), tn1 == -inf (a score below -65520 or -inf: no floor above it), top == +inf (a
// score above 65520: the row max would be wrong). Scores round apart with probability ~0.9995 per 8:16 group on random data, so the
// fallback costs little. Branch-free: the FMA pipe but for the three compares.
__device__ __forceinline__ bool half_select_group(float top, float tn, float tn1, float odd_step, float& floor_out,
                                                  float& max_out) {
  const float theta = 0.5f * (tn + tn1);
  floor_out = fmaf(fabsf(theta), odd_step, theta);
  max_out = top;  // the row max need not be exact (any m with P <= a few units is safe)
  return !(!(tn1 < tn) || tn1 == -INFINITY || top == INFINITY);
}
// 1.5 * 2^-24 (0x33C00000) where the f16 in bits 0-15 (or 16-31) of v is odd, else 0.
__device__ __forceinline__ float odd_step_lo(uint32_t v) { return __uint_as_float((v & 1u) * 0x33C00000u); }
__device__ __forceinline__ float odd_step_hi(uint32_t v) { return __uint_as_float((v & 0x10000u) * 0x33C0u); }
__device__ __forceinline__ float half_lo(uint32_t v) {
  float f;
  asm("{\n.reg .f16 l, h;\nmov.b32 {l, h}, %1;\ncvt.f32.f16 %0, l;\n}\n" : "=f"(f) : "r"(v));
  return f;
}
__device__ __forceinline__ float half_hi(uint32_t v) {
  float f;
  asm("{\n.reg .f16 l, h;\nmov.b32 {l, h}, %1;\ncvt.f32.f16 %0, h;\n}\n" : "=f"(f) : "r"(v));
  return f;
}

// The selection network on the f32 scores of row r: each group's N-th largest (thr[r][*]), the
// thread's row max of the kept scores (mx: the max of the group maxima, since a group's maximum is
// always kept; docs/semantics.md, "Output"), and whether some group's N-th and (N+1)-th largest
// are equal (tie).
__device__ __forceinline__ void select_row_f32(const float (&s)[SC], int r, float (&thr)[2][NGROUPS], float& mx,
                                               bool& tie) {
  if constexpr (SPARSE) {
    mx = -INFINITY;
#pragma unroll
    for (int g = 0; g < NGROUPS; ++g) {
      float v[M_SEL];
#pragma unroll
      for (int mm = 0; mm < M_SEL; ++mm) v[mm] = s[member_index(g, mm, r)];
      sort_desc<M_SEL>(v);
      thr[r][g] = v[N_SEL - 1];
      mx = fmaxf(mx, v[0]);
      if constexpr (TIE_INDEX || SPARSE_PV) tie |= v[N_SEL - 1] == v[N_SEL];
    }
  }
}
__device__ __forceinline__ void select_f32(const float (&s)[SC], float (&thr)[2][NGROUPS], float (&mx)[2], bool& tie) {
  select_row_f32(s, 0, thr, mx[0], tie);
  select_row_f32(s, 1, thr, mx[1], tie);
}
// NMH_HALF_SELECT, row r: its groups in pairs through the f16 network (group 2gp in the low
// halves, 2gp + 1 in the high ones), thr[r][*] from half_select_group and the row max of the f16
// group maxima. `decided` is cleared if some group was not decided (then the caller runs the f32
// network).
__device__ __forceinline__ void select_row_f16(const float (&s)[SC], int r, float (&thr)[2][NGROUPS], float& mx,
                                               bool& decided) {
  if constexpr (HALF_SELECT) {
    mx = -INFINITY;
#pragma unroll
    for (int gp = 0; gp < NGROUPS / 2; ++gp) {
      F16x2 h[M_SEL];
#pragma unroll
      for (int mm = 0; mm < M_SEL; ++mm)
        h[mm].bits = pack2<true>(s[member_index(2 * gp, mm, r)], s[member_index(2 * gp + 1, mm, r)]);
      sort_desc<M_SEL>(h);
      const uint32_t top = h[0].bits, tn = h[N_SEL - 1].bits, tn1 = h[N_SEL].bits;
      float gmax;
      decided &= half_select_group(half_lo(top), half_lo(tn), half_lo(tn1), odd_step_lo(tn), thr[r][2 * gp], gmax);
      mx = fmaxf(mx, gmax);
      decided &= half_select_group(half_hi(top), half_hi(tn), half_hi(tn1), odd_step_hi(tn), thr[r][2 * gp + 1], gmax);
      mx = fmaxf(mx, gmax);
    }
  }
}

// P (f32 accumulator layout) -> the A fragment of m64nDk16 step kk, which covers accumulator
// columns 16kk..16kk+15, i.e. registers 8kk..8kk+7 in order.
__device__ __forceinline__ void convert_p_slice(const float (&s)[SC], uint32_t (&pr)[KSTEPS][4], int kk) {
#pragma unroll
  for (int q = 0; q < 4; ++q) pr[kk][q] = pack2<FP16>(s[8 * kk + 2 * q], s[8 * kk + 2 * q + 1]);
}

// The online softmax's running statistics of row r after a tile whose row max (over the quad)
// is mx: the new running max m (NMH_LEAN: kept unless exceeded by more than LEAN_SLACK), its
// scaled shift mc (0 for a row with no allowed key yet, so that ex2 gives 0, not NaN), the
// factor alpha for O and l, and whether the max moved (grow_any, LEAN only).
__device__ __forceinline__ void update_row_max(int r, float mx, float c, float (&m)[2], float (&l)[2],
                                               float (&alpha)[2], float (&mc)[2], bool& grow_any) {
  if constexpr (LEAN) {
    // Keep the stale max unless this tile's exceeds it by more than LEAN_SLACK (log2 units);
    // m = -inf (nothing allowed yet) always moves unless mx is -inf as well.
    const bool grow = mx * c > fmaf(m[r], c, LEAN_SLACK);
    const float mn = grow ? mx : m[r];
    mc[r] = mn == -INFINITY ? 0.f : mn * c;
    alpha[r] = grow ? ex2(fmaf(m[r], c, -mc[r])) : 1.f;
    m[r] = mn;
    l[r] *= alpha[r];
    grow_any |= grow;
  } else {
    const float mn = fmaxf(m[r], mx);
    mc[r] = mn == -INFINITY ? 0.f : mn * c;
    alpha[r] = ex2(fmaf(m[r], c, -mc[r]));
    m[r] = mn;
    l[r] *= alpha[r];
  }
}

// The kept test of row r on the fast path: each entry's exponent fma(s, c, -mc) where s >= its
// group's floor thr, else an exponent below -2^41 (ex2 gives 0): drop_below, or drop_below2 with
// NMH_LEAN (the floor * 2^64 is exact).
__device__ __forceinline__ void exponents_kept_row(float (&s)[SC], int r, const float (&thr)[2][NGROUPS],
                                                   const float (&mc)[2], float c) {
#pragma unroll
  for (int g = 0; g < NGROUPS; ++g) {
    const float thr_x64 = thr[r][g] * 18446744073709551616.f;
#pragma unroll
    for (int mm = 0; mm < M_SEL; ++mm) {
      const int i = member_index(g, mm, r);
      if constexpr (LEAN) s[i] = drop_below2(fmaf(s[i], c, -mc[r]), s[i], thr_x64);
      else s[i] = drop_below(fmaf(s[i], c, -mc[r]), s[i], thr[r][g]);
    }
  }
}

// Mask probe, part 2, for row r: kept = the exponent the kernel really uses is not a dropped one.
__device__ __forceinline__ void probe_kept_row(const float (&s)[SC], int r, int n0, int t, const RowCtx& x,
                                               const FwdParams& p, int64_t probe_off) {
#pragma unroll
  for (int j = 0; j < BN / 8; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int key = n0 + col_key(j, t, e), row = x.qrow + 8 * r;
      if (row < x.q_len && key < x.kv_len)
        p.probe_kept[probe_off + row * p.probe_row + key] = s[4 * j + 2 * r + e] >= -2199023255552.f ? 1 : 0;
    }
}

// MID_WAIT: `mid` (the wait for P.V(j-1) and the fences after it) runs after the first
// MID_WAIT_AFTER exponentials, and P goes into `pr` slice by slice; otherwise `mid` and `pr` are
// not touched (the caller converts after its own wait).
template <bool EDGE, class Mid>
__device__ __forceinline__ bool softmax_tile(float (&s)[SC], int n0, int t, const RowCtx& x, const FwdParams& p,
                                             float (&m)[2], float (&l)[2], float (&alpha)[2], int64_t probe_off,
                                             uint32_t (&cp)[4][4], uint32_t (&cm)[4], bool& sp_tile,
                                             uint32_t (&pr)[KSTEPS][4], Mid&& mid) {
  const float c = p.scale_log2;
  // Mask probe, part 1: the raw scores (before any masking), visited tiles only.
  if constexpr (PROBE) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = n0 + col_key(j, t, e), row = x.qrow + 8 * r;
          if (row < x.q_len && key < x.kv_len) p.probe_s[probe_off + row * p.probe_row + key] = s[4 * j + 2 * r + e];
        }
  }
  // Edge tiles test each entry's key, n0 + col_key(j, t, e) = kbase + col_key(j, 0, e), against
  // bounds per row, brought into the entry's frame once (key_window): one or two compares with
  // a compile-time constant per entry and no branch. (Written as the rules themselves, with
  // `if (p.is_causal)` per entry, ptxas emitted three branches and a convergence barrier per
  // entry: an edge tile cost over twice an interior one.)
  const int kbase = n0 + col_key(0, t, 0);
  if constexpr (EDGE) {  // disallowed -> -inf (they then count as -inf in their group)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const KeyWindow w = key_window(x.qrow + 8 * r + x.offset, kbase, x, p);
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = col_key(j, 0, e);
          const bool ok = (col <= w.last) & (col > w.before);
          s[4 * j + 2 * r + e] = ok ? s[4 * j + 2 * r + e] : -INFINITY;
        }
    }
  }
  if constexpr (ROW_PIPE && !EDGE) {
    // Row 0's selection, then row 1's beside row 0's kept tests and exponentials (independent,
    // and in one basic block: ptxas interleaves the ALU and the FMA / MUFU work), then row 1's
    // kept tests and exponentials. With NMH_HALF_SELECT each row's rare f32 fallback is a
    // branch of its own, after the row's f16 network, so that no branch separates row 1's
    // network from row 0's exponentials.
    float thr[2][NGROUPS], mc[2], mx[2];
    bool grow_any = !LEAN;
    auto row_select = [&](int r) {  // thr[r][*] and the thread's row max mx[r]
      bool tie = false;  // (the threshold rule: no tie test)
      if constexpr (HALF_SELECT) {
        bool decided = true;
        select_row_f16(s, r, thr, mx[r], decided);
        if (!decided) select_row_f32(s, r, thr, mx[r], tie);  // rare
      } else {
        select_row_f32(s, r, thr, mx[r], tie);
      }
    };
    auto row_stats = [&](int r) {  // the quad's row max, the running max, sum and alpha
      float mxr = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mxr = fmaxf(mxr, __shfl_xor_sync(0xffffffffu, mxr, 2));
      update_row_max(r, mxr, c, m, l, alpha, mc, grow_any);
    };
    auto row_exps = [&](int r) {
      exponents_kept_row(s, r, thr, mc, c);
      if constexpr (PROBE) probe_kept_row(s, r, n0, t, x, p, probe_off);
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int i = 4 * j + 2 * r + e;
          s[i] = ex2(s[i]);
          if constexpr (!MMA_ROWSUM) l[r] += s[i];
          if constexpr (MID_WAIT) {
            if (r == 0 && i == 4 * (MID_WAIT_AFTER / 2 - 1) + 1) mid(s[i]);  // after row 0's first 16
            // P's operand slice kk (accumulator registers 8kk..8kk+7) is complete after row 1's
            // last entry in it.
            if (r == 1 && i % 8 == 7) convert_p_slice(s, pr, i / 8);
          }
        }
    };
    row_select(0);
    row_stats(0);
    row_select(1);
    row_exps(0);
    row_stats(1);
    row_exps(1);
    if constexpr (LEAN) return __any_sync(0xffffffffu, grow_any);
    return true;
  }
  float mx[2];
  float thr[2][NGROUPS];  // the N-th largest of each group (selection only)
  bool tie = false;       // some group's N-th and (N+1)-th largest are equal ("index" rule)
  if constexpr (HALF_SELECT && !EDGE) {
    // One branch per tile, rarely taken, into the f32 network for all of this thread's groups
    // (per-group branches cost more in latency than they save).
    bool decided = true;
    select_row_f16(s, 0, thr, mx[0], decided);
    select_row_f16(s, 1, thr, mx[1], decided);
    if (!decided) select_f32(s, thr, mx, tie);
  } else if constexpr (SPARSE) {
    select_f32(s, thr, mx, tie);
  } else {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = s[2 * r];
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) mx[r] = fmaxf(mx[r], s[4 * j + 2 * r + e]);
    }
  }
  float mc[2];
  bool grow_any = !LEAN;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    update_row_max(r, mx[r], c, m, l, alpha, mc, grow_any);
  }
  if constexpr (SPARSE_PV) {
    // Interior tile and no group of the warpgroup with its 2nd and 3rd largest equal: every
    // group keeps exactly its two largest, which the sparse A operand holds directly.
    // (NMH_SASS_INTERIOR, counting only: the compressed path alone.)
    sp_tile = SASS_INTERIOR ? true : (!EDGE && !warpgroup_any(tie));
    if (sp_tile) {
      const float* sc = s;
      uint32_t w[4][2];
#pragma unroll
      for (int jr = 0; jr < 4; ++jr) w[jr][0] = w[jr][1] = 0u;
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int g = 0; g < NGROUPS; ++g) {
          const int jr = g >> 1, e = g & 1;
          const float s0 = sc[member_index(g, 0, r)], s1 = sc[member_index(g, 1, r)];
          const float s2 = sc[member_index(g, 2, r)], s3 = sc[member_index(g, 3, r)];
          const float t2 = thr[r][g];
          const bool k0 = s0 >= t2, k1 = s1 >= t2, k2 = s2 >= t2, k3 = s3 >= t2;  // exactly two
          // The first kept member is 0, else 1, else 2; the second 3, else 2, else 1.
          const float v0 = k0 ? s0 : (k1 ? s1 : s2), v1 = k3 ? s3 : (k2 ? s2 : s1);
          const uint32_t i0 = k0 ? 0u : (k1 ? 1u : 2u), i1 = k3 ? 3u : (k2 ? 2u : 1u);
          const float p0 = ex2(fmaf(v0, c, -mc[r])), p1 = ex2(fmaf(v1, c, -mc[r]));
          l[r] += p0 + p1;
          cp[jr][2 * e + r] = pack2<FP16>(p0, p1);  // reg 0/1: chunk t, rows g / g+8; 2/3: chunk 4+t
          w[jr][e] |= (i0 | (i1 << 2)) << (4 * t + 16 * r);
        }
      // Metadata: lane 4g+0 supplies chunks 0-3 (e = 0 of threads t = 0..3), lane 4g+1 chunks 4-7.
#pragma unroll
      for (int jr = 0; jr < 4; ++jr) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          w[jr][e] |= __shfl_xor_sync(0xffffffffu, w[jr][e], 1);
          w[jr][e] |= __shfl_xor_sync(0xffffffffu, w[jr][e], 2);
        }
        cm[jr] = (t & 1) ? w[jr][1] : w[jr][0];
      }
      if constexpr (LEAN) return __any_sync(0xffffffffu, grow_any);
      return true;
    }
  }
  // The exponents, with dropped entries at -inf (exact path) or below -2^41 (fast path).
  bool exact = EDGE;
  if constexpr (SPARSE && TIE_INDEX) {
    if (!EDGE) exact = __any_sync(0xffffffffu, tie);  // warp-uniform
  }
  if constexpr (!SPARSE) {
#pragma unroll
    for (int i = 0; i < SC; ++i) s[i] = fmaf(s[i], c, -mc[(i >> 1) & 1]);
  } else {
    if (!exact) {
      exponents_kept_row(s, 0, thr, mc, c);
      exponents_kept_row(s, 1, thr, mc, c);
    } else {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const DenseRegion dr = dense_region(x.qrow + 8 * r + x.offset, kbase, x, p);
#pragma unroll
        for (int g = 0; g < NGROUPS; ++g) {
          const float tn = thr[r][g];
          int quota = N_SEL;
          if constexpr (TIE_INDEX) {
#pragma unroll
            for (int mm = 0; mm < M_SEL; ++mm) quota -= s[member_index(g, mm, r)] > tn ? 1 : 0;
          }
          int eq = 0;  // members equal to tn seen so far, in key order
#pragma unroll
          for (int mm = 0; mm < M_SEL; ++mm) {
            const int i = member_index(g, mm, r);
            const float v = s[i];
            bool kept;
            if constexpr (TIE_INDEX) {
              // Exactly N: everything above the N-th largest, then the lowest-index ties.
              kept = v > tn || (v == tn && eq < quota);
              eq += v == tn ? 1 : 0;
            } else {
              kept = v >= tn;
            }
            if constexpr (EDGE) {  // the dense region: sinks, the dense window, decode steps
              const int col = col_key((g >> 1) + R_PERM * mm, 0, g & 1);  // (c is the scale)
              kept |= (col < dr.sinks_end) | ((col > dr.window_before) & (col <= dr.window_last));
            }
            s[i] = kept ? fmaf(v, c, -mc[r]) : -INFINITY;
          }
        }
      }
    }
  }
  if constexpr (PROBE) {
    probe_kept_row(s, 0, n0, t, x, p, probe_off);
    probe_kept_row(s, 1, n0, t, x, p, probe_off);
  }
#pragma unroll
  for (int i = 0; i < SC; ++i) {
    s[i] = ex2(s[i]);
    if constexpr (!MMA_ROWSUM) l[(i >> 1) & 1] += s[i];
    if constexpr (MID_WAIT) {
      if (i == MID_WAIT_AFTER - 1) {
        mid(s[i]);  // P.V(j-1) has finished: its operand registers may be written
#pragma unroll
        for (int kk = 0; kk < MID_WAIT_AFTER / 8; ++kk) convert_p_slice(s, pr, kk);
      } else if (i > MID_WAIT_AFTER && i % 8 == 7) {
        convert_p_slice(s, pr, i / 8);
      }
    }
  }
  if constexpr (LEAN) return __any_sync(0xffffffffu, grow_any);
  return true;
}

// One k16 step of S = Q.K^T, m64n128 or m64n64 by the accumulator's size (an overload, so that
// the form a kernel does not use is never instantiated).
template <bool F16>
__device__ __forceinline__ void qk_mma(float (&s)[64], uint64_t dq, uint64_t dk, int scale_d) {
  if constexpr (F16) wgmma_qk_ss_n128_f16(s, dq, dk, scale_d);
  else wgmma_qk_ss_n128_bf16(s, dq, dk, scale_d);
}
template <bool F16>
__device__ __forceinline__ void qk_mma(float (&s)[32], uint64_t dq, uint64_t dk, int scale_d) {
  if constexpr (F16) wgmma_qk_ss_n64_f16(s, dq, dk, scale_d);
  else wgmma_qk_ss_n64_bf16(s, dq, dk, scale_d);
}
template <bool F16>
__device__ __forceinline__ void qk_gemm(float (&s)[SC], uint64_t dq, uint64_t dk) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    // Q's and K's atom columns lie BM and BN rows apart (the same with two consumers and 128 keys).
    const uint32_t off_q = (uint32_t)((kk / 4) * Q_ATOM_BYTES + (kk % 4) * 32) >> 4;
    const uint32_t off_k = (uint32_t)((kk / 4) * ATOM_BYTES + (kk % 4) * 32) >> 4;
    qk_mma<F16>(s, dq + off_q, dk + off_k, kk > 0 ? 1 : 0);
  }
}
// NACC = the accumulator registers: D / 2, or D / 2 + 4 with the ones columns (MMA_ROWSUM).
template <bool F16, int NACC>
__device__ __forceinline__ void pv_gemm(float (&o)[NACC], const uint32_t (&pr)[KSTEPS][4], uint64_t dv) {
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk) {
    const uint64_t d = dv + ((uint32_t)(kk * 2048) >> 4);  // 16 keys x 128 B per k-step
    if constexpr (NACC == 68) {
      if constexpr (F16) wgmma_pv_rs_n136_f16(o, pr[kk], d, 1);
      else wgmma_pv_rs_n136_bf16(o, pr[kk], d, 1);
    } else if constexpr (NACC == 64) {
      if constexpr (F16) wgmma_pv_rs_n128_f16(o, pr[kk], d, 1);
      else wgmma_pv_rs_n128_bf16(o, pr[kk], d, 1);
    } else if constexpr (NACC == 36) {
      if constexpr (F16) wgmma_pv_rs_n72_f16(o, pr[kk], d, 1);
      else wgmma_pv_rs_n72_bf16(o, pr[kk], d, 1);
    } else {
      static_assert(NACC == 32, "P.V accumulators: m64n{64,72,128,136}");
      if constexpr (F16) wgmma_pv_rs_n64_f16(o, pr[kk], d, 1);
      else wgmma_pv_rs_n64_bf16(o, pr[kk], d, 1);
    }
  }
}
// O *= alpha per row (the online softmax's correction when the running max grew).
template <int R>
__device__ __forceinline__ void rescale_o(float (&o)[R], const float (&alpha)[2]) {
#pragma unroll
  for (int j = 0; j < R / 4; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      o[4 * j + 2 * r] *= alpha[r];
      o[4 * j + 2 * r + 1] *= alpha[r];
    }
}
// NMH_SPARSE_PV, tiles that keep more than two of a group: P (zeros where dropped) as two sparse
// operands per 32 keys, members {0, 1} (pr[jr]) and {2, 3} (pr[4 + jr]) of every group, with
// the fixed metadata 0x4 (indices 0, 1) and 0xE (2, 3) in every nibble: a dense P.V on the
// sparse V layout.
__device__ __forceinline__ void convert_p_split(const float (&s)[SC], uint32_t (&pr)[KSTEPS][4]) {
#pragma unroll
  for (int jr = 0; jr < 4; ++jr)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int e = 0; e < 2; ++e)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          pr[4 * h + jr][2 * e + r] =
              pack2<FP16>(s[member_index(2 * jr + e, 2 * h, r)], s[member_index(2 * jr + e, 2 * h + 1, r)]);
}
// P.V through wgmma.sp: one pass of 4 sparse MMAs (32 keys each) for a compressed tile, two for
// a split one, each pass its own commit group (the caller does not commit). The first pass reads
// pr[jr] and meta, the second pr[4 + jr] and meta_hi, straight from the registers the softmax /
// to_operand wrote before the first fence; nothing here writes a register an issued MMA reads.
// (PTX ISA, wgmma.wait_group: touching the A-fragment registers of a wgmma.mma_async before a
// wait that covers it is undefined behaviour; the MMA may read them at any time until then. The
// first version selected each pass's operand into loop-local registers, which a rolled loop
// reuses: the second pass overwrote the A and metadata registers of the first while its MMAs
// were in flight, and the split tiles were wrong on the H200.) The registers of the MMAs in
// flight stay reserved until the caller's wait: ptxas does that for every wgmma register
// operand (the overlap schedule's P(j-1) relies on it). The second pass is a loop with a
// run-time trip count (0 or 1) and a commit inside, not an if: a wgmma in a branch ptxas cannot
// prove uniform, or one left uncommitted across a back edge, made ptxas inject a fence there and
// serialize every wgmma of the function (C7519/C7520).
// (NACC: O's accumulator registers, D / 2; the ones columns of MMA_ROWSUM never meet wgmma.sp.)
template <bool F16, int NACC>
__device__ __forceinline__ void pv_gemm_sparse(float (&o)[NACC], const uint32_t (&pr)[KSTEPS][4], const uint32_t (&meta)[4],
                                               const uint64_t (&dsl)[4], int passes) {
  constexpr int DD = 2 * NACC;
  const uint32_t meta_hi = 0xEEEEEEEEu;  // the split tiles' second pass: members {2, 3}
  wg_fence();
#pragma unroll
  for (int jr = 0; jr < 4; ++jr) {
    if constexpr (DD == 128) {
      if constexpr (F16) wgmma_pvsp_rs_n128_f16(o, pr[jr], dsl[jr], 1, meta[jr]);
      else wgmma_pvsp_rs_n128_bf16(o, pr[jr], dsl[jr], 1, meta[jr]);
    } else if constexpr (DD == 64) {
      if constexpr (F16) wgmma_pvsp_rs_n64_f16(o, pr[jr], dsl[jr], 1, meta[jr]);
      else wgmma_pvsp_rs_n64_bf16(o, pr[jr], dsl[jr], 1, meta[jr]);
    }
  }
  wg_commit();
#pragma unroll 1
  for (int pass = 1; pass < passes; ++pass) {
    wg_fence();
#pragma unroll
    for (int jr = 0; jr < 4; ++jr) {
      if constexpr (DD == 128) {
        if constexpr (F16) wgmma_pvsp_rs_n128_f16(o, pr[4 + jr], dsl[jr], 1, meta_hi);
        else wgmma_pvsp_rs_n128_bf16(o, pr[4 + jr], dsl[jr], 1, meta_hi);
      } else if constexpr (DD == 64) {
        if constexpr (F16) wgmma_pvsp_rs_n64_f16(o, pr[4 + jr], dsl[jr], 1, meta_hi);
        else wgmma_pvsp_rs_n64_bf16(o, pr[4 + jr], dsl[jr], 1, meta_hi);
      }
    }
    wg_commit();
  }
}
// P (f32 accumulator layout) -> the A fragments of the 8 m64nDk16 steps of P.V.
__device__ __forceinline__ void convert_p(const float (&s)[SC], uint32_t (&pr)[KSTEPS][4]) {
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk) convert_p_slice(s, pr, kk);
}

#if NMH_TMA
extern "C" __global__ void __launch_bounds__(THREADS, 1) nm_attn_fwd(const __grid_constant__ FwdParams p,
                                                                     const __grid_constant__ TmaParams tm) {
#else
extern "C" __global__ void __launch_bounds__(THREADS, 1) nm_attn_fwd(const __grid_constant__ FwdParams p) {
#endif
  extern __shared__ __align__(16) uint8_t smem_raw[];
  uint8_t* smem = (uint8_t*)(((uintptr_t)smem_raw + 1023) & ~(uintptr_t)1023);
  const uint32_t sbase = smem_u32(smem);
  const uint32_t bars = sbase + BAR_OFF;
  auto bar = [&](int i) { return bars + 8u * (uint32_t)i; };

  // Heaviest causal tiles first (the last query blocks see the most keys).
  const int m_block = p.is_causal ? (int)(gridDim.x - 1 - blockIdx.x) : (int)blockIdx.x;
  const int head = blockIdx.y, seq = blockIdx.z;
  const int q_len = p.q_len[seq];
  const int m0 = m_block * BM;
  if (m0 >= q_len) return;  // whole CTA, before any barrier is used
  const int kv_len = p.k_len[seq];
  const int64_t q_start = p.q_start[seq], k_start = p.k_start[seq];
  const int offset = kv_len - q_len;  // queries are the last q_len keys
  const int p_lo = m0 + offset;
  const int p_hi = min(m0 + BM, q_len) - 1 + offset;
  const int key_end = p.is_causal ? min(kv_len, p_hi + 1) : kv_len;
  const int t_end = key_end > 0 ? (key_end + BN - 1) / BN : 0;
  // With a sliding window, tiles wholly older than every row's window are never visited.
  const int t_begin = p.sliding_window > 0 ? max(p_lo - p.sliding_window + 1, 0) / BN : 0;
  const int nt = max(t_end - t_begin, 0);  // tiles visited, in descending key order

  if (threadIdx.x == 0) {
    mbar_init(bar(BAR_Q), FULL_ARRIVALS);
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(bar(BAR_FULL_K + s), FULL_ARRIVALS);
      mbar_init(bar(BAR_FULL_V + s), FULL_ARRIVALS);
      mbar_init(bar(BAR_EMPTY_K + s), CONSUMER_WARPS);
      mbar_init(bar(BAR_EMPTY_V + s), CONSUMER_WARPS);
    }
  }
  if constexpr (MMA_ROWSUM) {
    // The ones atoms, written once: 16-bit 1.0 everywhere (the swizzle moves chunks, not values).
    // The writers fence their generic-proxy stores for the async proxy (wgmma) before the sync.
    constexpr uint32_t ONE2 = FP16 ? 0x3C003C00u : 0x3F803F80u;
    for (int c = threadIdx.x; c < STAGES * ATOM_BYTES / 16; c += THREADS) {
      const int st = c / (ATOM_BYTES / 16), off = (c % (ATOM_BYTES / 16)) * 16;
      st_shared_v4(sbase + V_OFF + st * V_STAGE_BYTES + TILE_BYTES + off, ONE2);
    }
    fence_proxy_async();
  }
  __syncthreads();

  // The warpgroup index through a shuffle from lane 0: ptxas cannot tell that threadIdx.x / 128
  // is warp-uniform, and without the shuffle everything derived from it (the Q descriptors,
  // the ping-pong barrier ids) lives in ordinary registers: the D = 64 three-warpgroup loop
  // spilled the four Q descriptors and reloaded them (LDL + R2UR) every tile.
  const int wg = __shfl_sync(0xffffffffu, (int)(threadIdx.x / 128), 0);
  const int lane = threadIdx.x % 32;
  const int kv_head = head / p.groups;


  if (wg == 0) {
    // ------------------------------------------------------------------ producer
    setmaxnreg_dec<PRODUCER_REGS>();
    if (nt == 0) return;
#if NMH_TMA
    // The TMA producers' first loads, by thread 0: the three maps prefetched, then Q, D / 64
    // boxes of BM rows (the host encodes the Q map's box from nmh_config's rows per CTA).
    auto load_q_by_tma = [&]() {
      prefetch_tmap(&tm.q);
      prefetch_tmap(&tm.k);
      prefetch_tmap(&tm.v);
      mbar_expect_tx(bar(BAR_Q), (uint32_t)Q_BYTES);
#pragma unroll
      for (int a = 0; a < D / 64; ++a)
        tma_load_3d(sbase + Q_OFF + a * BM * 128, &tm.q, 64 * a, head, (int)q_start + m0, bar(BAR_Q));
    };
#endif
#if NMH_TMA_BOUNDED
    // Thread 0 loads Q (as NMH_TMA) and every K / V tile whose rows lie inside the maps' bounds,
    // which writes the whole tile in its smem order (TILE_BYTES per expect_tx, as NMH_TMA):
    // NMH_TMA3D, one 4-D box per atom column for K and for V, (g, m) = (row0 / M, row0 % M);
    // NMH_SPARSE_PV, K as NMH_TMA (M element-strided boxes per atom column) and V as four 5-D
    // boxes per atom column (start rows row0 + 32 a). A tile that reaches past the bound (its
    // keys lie within 2M - 1 + 127 rows, or 131 rows, of the tensor's end) is loaded by all 128
    // producer threads with cp.async (zero fill past the sequence's end), then fenced,
    // synchronized (named barrier 4) and released by one arrival per full barrier
    // (FULL_ARRIVALS = 1). Such tiles are tiles 0 and 1 only (descending order, and row0 of
    // tile 0 lies below the tensor's end), i < STAGES: no empty-barrier wait is ever needed
    // there, so the other threads never wait on a barrier phase that thread 0 may have lapped.
    {
      const int tid = threadIdx.x;
      constexpr int ATOMS = D / 64;
      // TMA3D: the maps' g extent (<= 0: no tile fits). SPARSE_PV: the V map's d extent.
      const int bound = TMA3D ? (int)(tm.kv_rows / M_SEL) - 1 : (int)tm.kv_rows - 31;
      if (tid == 0) load_q_by_tma();
      for (int i = 0; i < nt; ++i) {
        const int s = i % STAGES, u = i / STAGES;
        const int n0 = (t_end - 1 - i) * BN;
        const int row0 = (int)k_start + n0;
        const int g0 = row0 / M_SEL, r0 = row0 % M_SEL;
        // The last coordinate a tile's boxes touch lies inside its map.
        const bool by_tma = TMA3D ? g0 + G_PERM <= bound : row0 + 96 + 3 < bound;
        if (by_tma) {
          if (tid == 0) {
            if (i >= STAGES) mbar_wait<SUSPEND_PRODUCER>(bar(BAR_EMPTY_K + s), (u - 1) & 1, 10 + s);
            mbar_expect_tx(bar(BAR_FULL_K + s), (uint32_t)TILE_BYTES);
#pragma unroll
            for (int a = 0; a < ATOMS; ++a) {
              if constexpr (TMA3D) {
                tma_load_4d(sbase + K_OFF + s * TILE_BYTES + a * ATOM_BYTES, &tm.k, 64 * a, kv_head, g0, r0,
                            bar(BAR_FULL_K + s));
              } else {
#pragma unroll
                for (int mm = 0; mm < M_SEL; ++mm)
                  tma_load_3d(sbase + K_OFF + s * TILE_BYTES + a * ATOM_BYTES + mm * (ATOM_BYTES / M_SEL), &tm.k,
                              64 * a, kv_head, row0 + mm, bar(BAR_FULL_K + s));
              }
            }
            if (i >= STAGES) mbar_wait<SUSPEND_PRODUCER>(bar(BAR_EMPTY_V + s), (u - 1) & 1, 20 + s);
            mbar_expect_tx(bar(BAR_FULL_V + s), (uint32_t)TILE_BYTES);
#pragma unroll
            for (int a = 0; a < ATOMS; ++a) {
              if constexpr (TMA3D) {
                tma_load_4d(sbase + V_OFF + s * V_STAGE_BYTES + a * ATOM_BYTES, &tm.v, 64 * a, kv_head, g0, r0,
                            bar(BAR_FULL_V + s));
              } else {
#pragma unroll
                for (int q32 = 0; q32 < BN / 32; ++q32)
                  tma_load_5d(sbase + V_OFF + s * V_STAGE_BYTES + a * ATOM_BYTES + q32 * 32 * 128, &tm.v, 64 * a,
                              kv_head, row0 + 32 * q32, 0, 0, bar(BAR_FULL_V + s));
              }
            }
          }
        } else {
          const uint16_t* kbase = p.k + k_start * p.k_row + (int64_t)kv_head * p.k_head;
          const uint16_t* vbase = p.v + k_start * p.v_row + (int64_t)kv_head * p.v_head;
          if (i >= STAGES) mbar_wait<SUSPEND_PRODUCER>(bar(BAR_EMPTY_K + s), (u - 1) & 1, 10 + s);
          load_tile<true>(sbase + K_OFF + s * TILE_BYTES, kbase, p.k_row, n0, kv_len, tid);
          if (i >= STAGES) mbar_wait<SUSPEND_PRODUCER>(bar(BAR_EMPTY_V + s), (u - 1) & 1, 20 + s);
          load_tile<true, 128, SPARSE_PV>(sbase + V_OFF + s * V_STAGE_BYTES, vbase, p.v_row, n0, kv_len, tid);
          cp_async_commit();
          cp_async_wait<0>();
          fence_proxy_async();
          named_sync(4, 128);
          if (tid == 0) {
            mbar_arrive(bar(BAR_FULL_K + s));
            mbar_arrive(bar(BAR_FULL_V + s));
          }
        }
      }
    }
    return;
#elif NMH_TMA
    // One thread issues every load: expect_tx on the full barrier, then the boxes (D / 64 per
    // tile, times M for an N:M variant: box mm holds key rows n0 + mm, n0 + mm + M, ... = the
    // G smem rows mm*G .. mm*G + G - 1 of the group-permuted tile; G*128 B is a multiple of
    // 1024 B, so the 128-byte swizzle phase matches the whole-tile layout). Rows past the
    // tensor's end are zero-filled by TMA; rows past a sequence's end inside the packed tensor
    // are its neighbour's (finite data is masked to -inf / P = 0 by the edge tiles; a
    // non-finite neighbour would leak into P.V as 0 * inf: documented for this variant).
    if (threadIdx.x != 0) return;
    constexpr int ATOMS = D / 64;
    constexpr int MEMBERS = SPARSE ? M_SEL : 1;
    constexpr uint32_t BOX_BYTES = ATOM_BYTES / MEMBERS;
    load_q_by_tma();
    for (int i = 0; i < nt; ++i) {
      const int s = i % STAGES, u = i / STAGES;
      const int row0 = (int)k_start + (t_end - 1 - i) * BN;
      if (i >= STAGES) mbar_wait<SUSPEND_PRODUCER>(bar(BAR_EMPTY_K + s), (u - 1) & 1, 10 + s);
      mbar_expect_tx(bar(BAR_FULL_K + s), (uint32_t)TILE_BYTES);
#pragma unroll
      for (int a = 0; a < ATOMS; ++a)
#pragma unroll
        for (int mm = 0; mm < MEMBERS; ++mm)
          tma_load_3d(sbase + K_OFF + s * TILE_BYTES + a * ATOM_BYTES + mm * BOX_BYTES, &tm.k, 64 * a, kv_head,
                      row0 + mm, bar(BAR_FULL_K + s));
      if (i >= STAGES) mbar_wait<SUSPEND_PRODUCER>(bar(BAR_EMPTY_V + s), (u - 1) & 1, 20 + s);
      mbar_expect_tx(bar(BAR_FULL_V + s), (uint32_t)TILE_BYTES);
#pragma unroll
      for (int a = 0; a < ATOMS; ++a)
#pragma unroll
        for (int mm = 0; mm < MEMBERS; ++mm)
          tma_load_3d(sbase + V_OFF + s * V_STAGE_BYTES + a * ATOM_BYTES + mm * BOX_BYTES, &tm.v, 64 * a, kv_head,
                      row0 + mm, bar(BAR_FULL_V + s));
    }
    return;
#else
    const int tid = threadIdx.x;
    const uint16_t* qbase = p.q + q_start * p.q_row + (int64_t)head * p.q_head;
    const uint16_t* kbase = p.k + k_start * p.k_row + (int64_t)kv_head * p.k_head;
    const uint16_t* vbase = p.v + k_start * p.v_row + (int64_t)kv_head * p.v_head;
    load_tile<false, BM>(sbase + Q_OFF, qbase, p.q_row, m0, q_len, tid);
    cp_async_commit();
    // Groups are committed in the order Q, K0, V0, K1, V1, ...: "wait_group 1" right after
    // committing K_i completes V_{i-1}; right after committing V_i it completes K_i (and Q).
    // Each completed load is fenced (generic -> async proxy, for wgmma) by its writer, then
    // one lane per warp arrives on the full barrier (count 4).
    for (int i = 0; i < nt; ++i) {
      const int s = i % STAGES, u = i / STAGES;
      const int n0 = (t_end - 1 - i) * BN;
      if (i >= STAGES) mbar_wait<SUSPEND_PRODUCER>(bar(BAR_EMPTY_K + s), (u - 1) & 1, 10 + s);
      load_tile<SPARSE>(sbase + K_OFF + s * TILE_BYTES, kbase, p.k_row, n0, kv_len, tid);
      cp_async_commit();
      if (i > 0) {
        cp_async_wait<1>();
        fence_proxy_async();
        __syncwarp();
        if (lane == 0) mbar_arrive(bar(BAR_FULL_V + (i - 1) % STAGES));
      }
      if (i >= STAGES) mbar_wait<SUSPEND_PRODUCER>(bar(BAR_EMPTY_V + s), (u - 1) & 1, 20 + s);
      load_tile<SPARSE, 128, SPARSE_PV>(sbase + V_OFF + s * V_STAGE_BYTES, vbase, p.v_row, n0, kv_len, tid);
      cp_async_commit();
      cp_async_wait<1>();
      fence_proxy_async();
      __syncwarp();
      if (lane == 0) {
        if (i == 0) mbar_arrive(bar(BAR_Q));
        mbar_arrive(bar(BAR_FULL_K + s));
      }
    }
    cp_async_wait<0>();
    fence_proxy_async();
    __syncwarp();
    if (lane == 0) mbar_arrive(bar(BAR_FULL_V + (nt - 1) % STAGES));
    return;
#endif
  }

  // -------------------------------------------------------------------- consumers
  setmaxnreg_inc<CONSUMER_REGS>();
  const int wgc = wg - 1;                     // consumer warpgroup 0 / 1: rows 64*wgc ...
  const int warp = (threadIdx.x / 32) % 4;
  const int t = lane % 4;
  RowCtx x;
  x.q_len = q_len;
  x.kv_len = kv_len;
  x.p_lo = p_lo;
  x.p_hi = p_hi;
  x.qrow = m0 + 64 * wgc + 16 * warp + lane / 4;
  x.offset = offset;
  const int64_t probe_off = PROBE ? (int64_t)head * p.probe_head + q_start * p.probe_row : 0;

  [[maybe_unused]] uint32_t* const clocks =
      PHASE_CLOCKS ? reinterpret_cast<uint32_t*>(p.probe_s) +
                         (((size_t)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x) * NC * CLOCK_TILES *
                             CLOCK_STAMPS +
                         (size_t)wgc * CLOCK_TILES * CLOCK_STAMPS
                   : nullptr;
  // NMH_PHASE_CLOCKS only: one predicated store per stamp, no branch (a branch per stamp cost
  // ~15 instructions and a convergence barrier each).
  auto stamp = [&](int i, int k) {
    if constexpr (PHASE_CLOCKS)
      clock_store(clocks + (i < CLOCK_TILES ? i : 0) * CLOCK_STAMPS + k, warp == 0 && lane == 0 && i < CLOCK_TILES);
  };

  float o[O_ACC];
#pragma unroll
  for (int i = 0; i < O_ACC; ++i) o[i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, alpha[2];

  if (nt > 0) {
    const uint64_t dq = make_desc_sw128(sbase + Q_OFF + wgc * 64 * 128, 16, 1024);
    auto desc_k = [&](int s) { return make_desc_sw128(sbase + K_OFF + s * TILE_BYTES, 16, 1024); };
    auto desc_v = [&](int s) { return make_desc_sw128(sbase + V_OFF + s * V_STAGE_BYTES, ATOM_BYTES, 1024); };
    // Named barrier ids (ping-pong): a ring of turns, warpgroup c waits on 1 + c and hands the
    // turn to the next one (1 + (c + 1) % NC); 256 = the waiter's and the arriver's threads.
    // (Two warpgroups: written as before the ring existed, so that the verified ping-pong
    // variants compile to the same SASS.)
    const int my_turn = 1 + wgc, other_turn = NC == 2 ? 2 - wgc : 1 + (wgc + 1) % NC;
    const bool last_wg = NC == 2 ? wgc == 1 : wgc == NC - 1;  // its final hand-over would have no taker
    const bool not_last_wg = NC == 2 ? wgc == 0 : wgc != NC - 1;
    float s_acc[SC];
#pragma unroll
    for (int i = 0; i < SC; ++i) s_acc[i] = 0.f;
    uint32_t pr[KSTEPS][4];
    uint32_t meta[4];    // NMH_SPARSE_PV: the sparse operand's metadata
    uint32_t cp[4][4], cm[4];  // NMH_SPARSE_PV: the compressed P and its metadata, staged
    bool sp_tile = false;  // NMH_SPARSE_PV: this tile's P is compressed (warpgroup-uniform)
    bool need_rescale = true;  // whether O must be multiplied by alpha (NMH_LEAN skips it mostly)
    auto tile_n0 = [&](int i) { return (t_end - 1 - i) * BN; };
    // NMH_KV_PRETEST: whether K(i+1) and V(i) were there when tile i's softmax ended, this
    // thread's view; the next step votes on it (warp-uniform), so that the tests' latency runs
    // under the rest of this step.
    bool kv_seen = false;
    auto pretest = [&](int i) {
      if constexpr (KV_PRETEST) {
        const int n = i + 1;  // (past the last tile the flag is never read)
        kv_seen = mbar_test(bar(BAR_FULL_K + n % STAGES), (n / STAGES) & 1) &
                  mbar_test(bar(BAR_FULL_V + i % STAGES), (i / STAGES) & 1);
      }
    };
    // `mid`: what MID_WAIT runs inside the softmax (the wait for P.V(i-1)); unused otherwise.
    auto softmax = [&](int i, auto kind, auto&& mid) {
      const int n0 = tile_n0(i);
      constexpr int K = decltype(kind)::value;
      // A constant for EdgeTile / InteriorTile: the other branch is not compiled into that loop.
      if (K == EdgeTile::value || (K == AnyTile::value && tile_is_edge(n0, x, p)))
        need_rescale = softmax_tile<true>(s_acc, n0, t, x, p, m, l, alpha, probe_off, cp, cm, sp_tile, pr, mid);
      else
        need_rescale = softmax_tile<false>(s_acc, n0, t, x, p, m, l, alpha, probe_off, cp, cm, sp_tile, pr, mid);
    };
    auto nothing_in_flight = [](float) {};
    // P -> the A operand (after the wait that ends the previous P.V: its operand registers are
    // read until then) and the P.V issue. The sparse path staged the compressed P already.
    auto to_operand = [&]() {
      if constexpr (SPARSE_PV) {
        if (sp_tile) {
#pragma unroll
          for (int jr = 0; jr < 4; ++jr) {
            meta[jr] = cm[jr];
#pragma unroll
            for (int q = 0; q < 4; ++q) pr[jr][q] = cp[jr][q];
          }
        } else {
#pragma unroll
          for (int jr = 0; jr < 4; ++jr) meta[jr] = 0x44444444u;  // first pass: members {0, 1}
          convert_p_split(s_acc, pr);
        }
      } else {
        convert_p(s_acc, pr);
      }
    };
    // NMH_SPARSE_PV: every register a wgmma of the branchy P.V reads (the four slice
    // descriptors, the operand, the metadata) is written before the wgmma fence; one written
    // after it makes ptxas inject a fence inside the branch and serialize the wgmma (C7520).
    uint64_t dsl[4];
    auto prep_pv = [&](int stage) {
      if constexpr (SPARSE_PV) {
#pragma unroll
        for (int jr = 0; jr < 4; ++jr) {
          dsl[jr] = desc_v(stage) + ((uint32_t)(jr * 4096) >> 4);  // 32 keys x 128 B per k32 step
          asm volatile("" : "+l"(dsl[jr])::"memory");
        }
      }
    };
    auto pv = [&](int stage) {
      if constexpr (SPARSE_PV) pv_gemm_sparse<FP16, O_ACC>(o, pr, meta, dsl, sp_tile ? 1 : 2);
      else pv_gemm<FP16, O_ACC>(o, pr, desc_v(stage));
    };
    // Warp-uniform branch around ordinary FMULs (no wgmma inside: the warpgroup's MMAs stay
    // in step whatever each warp decides).
    auto maybe_rescale = [&]() {
      if (!LEAN || need_rescale) rescale_o(o, alpha);
    };

    mbar_wait(bar(BAR_Q), 0, 1);
    // ---- tile 0: Q.K^T and softmax only
    if (PINGPONG && last_wg) named_arrive(1, 256);  // consumer warpgroup 0 issues first
    mbar_wait(bar(BAR_FULL_K), 0, 30);
    if (PINGPONG) named_sync(my_turn, 256);
    wg_fence();
    qk_gemm<FP16>(s_acc, dq, desc_k(0));
    wg_commit();
    if (PINGPONG && (not_last_wg || nt > 1)) named_arrive(other_turn, 256);
    wg_wait<0>();
    reg_fence(s_acc);
    __syncwarp();
    if (lane == 0) mbar_arrive(bar(BAR_EMPTY_K));
    softmax(0, AnyTile{}, nothing_in_flight);
    pretest(0);
    if constexpr (!MID_WAIT) to_operand();

    // ---- tiles 1..nt-1: Q.K^T(i) and P.V(i-1) issued together. With OVERLAP the softmax of
    // tile i runs while P.V(i-1) is still in flight; without, P(i-1) is dead during it.
    auto step = [&](int i, auto kind) {
      const int s = i % STAGES, u = i / STAGES;
      const int sp = (i - 1) % STAGES, up = (i - 1) / STAGES;
      stamp(i, 0);
      if (!KV_PRETEST || !__all_sync(0xffffffffu, kv_seen)) {
        mbar_wait(bar(BAR_FULL_K + s), u & 1, 30 + s);
        stamp(i, 7);
        mbar_wait(bar(BAR_FULL_V + sp), up & 1, 40 + sp);
      }
      stamp(i, 1);
      if (PINGPONG) named_sync(my_turn, 256);
      stamp(i, 2);
      prep_pv(sp);
      wg_fence();
      qk_gemm<FP16>(s_acc, dq, desc_k(s));
      wg_commit();
      if constexpr (LATE_RESCALE) {
        // FA3's order: O (tiles < i-1, scaled to m(i-2)) is brought to m(i-1) by the factor of
        // softmax(i-1), under Q.K^T(i), just before P.V(i-1) adds P(i-1) (scaled to m(i-1)).
        maybe_rescale();
        wg_fence();  // O was written by ordinary instructions since the last fence
      }
      pv(sp);
      if constexpr (!SPARSE_PV) wg_commit();  // the sparse P.V commits each of its passes
      if (PINGPONG && (not_last_wg || i < nt - 1)) named_arrive(other_turn, 256);
      stamp(i, 3);
      if constexpr (OVERLAP) {
        wg_wait<1>();  // Q.K^T(i) done, P.V(i-1) may still run
        reg_fence(s_acc);
        stamp(i, 4);
        __syncwarp();
        if (!MID_WAIT && lane == 0) mbar_arrive(bar(BAR_EMPTY_K + s));
        auto pv_done = [&](float last_p) {
          if constexpr (MID_WAIT) {
            // The K stage is released here, after the first exponentials: ptxas schedules the
            // wait below as early as it can (it has no operands), so it is pinned behind an
            // arrive that depends on the last exponential so far. An exponential is never
            // negative (NaN compares false), so the test is always true.
            __syncwarp();
            if (lane == 0 && !(last_p < 0.f)) mbar_arrive(bar(BAR_EMPTY_K + s));
          }
          wg_wait<0>();  // P.V(i-1) done: its P registers and V stage are free
          reg_fence(o);
          if constexpr (MID_WAIT) {
#pragma unroll
            for (int kk = 0; kk < KSTEPS; ++kk) reg_fence(pr[kk]);  // P(i) is written only after this
          } else {
            reg_fence(s_acc);
          }
          __syncwarp();
          if (lane == 0) mbar_arrive(bar(BAR_EMPTY_V + sp));
        };
        if constexpr (MID_WAIT) {
          softmax(i, kind, pv_done);
          pretest(i);
          stamp(i, 5);
        } else {
          softmax(i, kind, nothing_in_flight);
          pretest(i);
          stamp(i, 5);
          pv_done(0.f);
        }
      } else {
        wg_wait<0>();
        reg_fence(s_acc);
        reg_fence(o);
        stamp(i, 4);
        __syncwarp();
        if (lane == 0) {
          mbar_arrive(bar(BAR_EMPTY_K + s));
          mbar_arrive(bar(BAR_EMPTY_V + sp));
        }
        softmax(i, kind, nothing_in_flight);
        pretest(i);
        stamp(i, 5);
      }
      if constexpr (!LATE_RESCALE) maybe_rescale();
      if constexpr (!MID_WAIT) to_operand();
      if constexpr (PHASE_CLOCKS) reg_fence(pr[KSTEPS - 1]);  // (P complete before the last stamp)
      stamp(i, 6);
    };
    if constexpr (SPLIT_LOOP) {
      // Runs of edge tiles (the causal diagonal, the sequence's end, the dense window lead in
      // descending key order; sinks and the sliding window's far end trail) alternate with
      // runs of interior tiles; each run kind has its own loop body. Every tile is still
      // classified by tile_is_edge, once, so any order of edge and interior tiles is right.
      int i = 1;
      while (i < nt) {
        for (; i < nt && tile_is_edge(tile_n0(i), x, p); ++i) step(i, EdgeTile{});
        for (; i < nt && !tile_is_edge(tile_n0(i), x, p); ++i) step(i, InteriorTile{});
      }
    } else {
      for (int i = 1; i < nt; ++i) step(i, AnyTile{});
    }
    // ---- last P.V
    const int sl = (nt - 1) % STAGES, ul = (nt - 1) / STAGES;
    mbar_wait(bar(BAR_FULL_V + sl), ul & 1, 40 + sl);
    if constexpr (LATE_RESCALE) maybe_rescale();  // the last tile's factor
    prep_pv(sl);
    wg_fence();
    pv(sl);
    if constexpr (!SPARSE_PV) wg_commit();
    wg_wait<0>();
    reg_fence(o);
  }

  // -------------------------------------------------------------------- epilogue
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if constexpr (MMA_ROWSUM) {
      l[r] = o[D / 2 + 2 * r];  // the whole row's sum already (the MMA summed over all keys)
    } else {
      l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
      l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
  }
  // NMH_LEARNED_SINKS (GPT-OSS; session 24): one more logit in each row's denominator, with no
  // value row: sum = l 2^(m c) + 2^(sink log2 e), so O is scaled by 2^(m c - mt) / (sum / 2^mt)
  // and the lse is mt + log2(sum / 2^mt), mt the larger exponent. Its own variant, so that the
  // kernels without sinks keep their code.
  const float sink_log2 = LEARNED_SINKS ? p.sinks[head] * 1.4426950408889634f : -INFINITY;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = x.qrow + 8 * r;
    if (row >= q_len) continue;
    // A row with no kept key outputs exactly 0 and lse = -inf, or the sink's logit with a learned
    // sink (docs/semantics.md).
    float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    float lse = l[r] > 0.f ? m[r] * p.scale_log2 + __log2f(l[r]) : sink_log2;
    if (LEARNED_SINKS && l[r] > 0.f) {
      const float mc = m[r] * p.scale_log2, mt = fmaxf(mc, sink_log2);
      const float keep = ex2(mc - mt), total = fmaf(l[r], keep, ex2(sink_log2 - mt));
      inv = keep / total;
      lse = mt + __log2f(total);
    }
    uint16_t* orow = p.o + (q_start + row) * p.o_row + (int64_t)head * p.o_head + 2 * t;
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
      *reinterpret_cast<uint32_t*>(orow + 8 * j) = pack2<FP16>(o[4 * j + 2 * r] * inv, o[4 * j + 2 * r + 1] * inv);
    if (t == 0 && p.lse != nullptr) p.lse[(q_start + row) * p.lse_row + head] = lse;
  }
}
