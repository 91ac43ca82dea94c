// The one place where the mma.sp kernel family's data layouts are defined: which lane of a warp
// holds which element of one mma.sp.sync.aligned.m16n8k32.row.col.f32.{bf16,f16} tile, and where
// the offline reorder (sparselora/gpu_layout.py) puts each canonical value and metadata nibble so
// that every lane's operands arrive with 16-byte loads. Host and device code both include it; the
// Python emulator and the reorder build their tables from the same formulas, and
// tests/test_sparse_mma_layout.py compares this header (host-compiled) with them for all 32 lanes.
//
// Roles: the weight W [N, K] (N = out_features) is the sparse operand A (M of the MMA = output
// features), the tokens are the MMA's N (B = x^T, 8 tokens per tile), so D = W x^T per tile.
//
// Fragments (PTX ISA, "Matrix fragments for sparse mma.m16n8k32 with .f16/.bf16"; A as for dense
// m16n8k16, the compressed 16x16 tile of a 16x32 dense tile). g = lane >> 2, t = lane & 3.
//
//   A (compressed 16 x 16, kept values in canonical order: compressed column c of a row is kept
//   value c of its 32-column k-tile, i.e. dense group c / 2):
//                 compressed col ->  0 1 | 2 3 | 4 5 | 6 7 || 8 9 |10 11|12 13|14 15
//     row g      (a0,a1 | a4,a5):   lane 4g+t holds cols 2t,2t+1 (a0,a1) and 2t+8,2t+9 (a4,a5)
//     row g + 8  (a2,a3 | a6,a7):   same lane, same columns (a2,a3) and (a6,a7)
//     e.g. lane 5 (g=1,t=1): a0,a1 = A[1][2..3], a2,a3 = A[9][2..3], a4,a5 = A[1][10..11], a6,a7 = A[9][10..11]
//
//   B (dense 32 x 8, k x token):    lane 4g+t holds b(2j), b(2j+1) = B[8j + 2t + {0,1}][g], j = 0..3
//                                    (ldmatrix.x4 of x [token][k] rows, matrix j = k 8j..8j+7)
//   C/D (16 x 8 f32):               c0,c1 = D[g][2t + {0,1}], c2,c3 = D[g + 8][2t + {0,1}]
//
//   Metadata (one 32-bit register per lane; the sparsity selector s picks the supplying lanes):
//     s = 0: lanes with t in {0, 1} supply it; s = 1: lanes with t in {2, 3}.   p = t & 1:
//       bits  0..15 = nibbles of row g     for dense columns 16p .. 16p + 15 of the k-tile
//       bits 16..31 = nibbles of row g + 8 for dense columns 16p .. 16p + 15
//     nibble q of a 16-bit half = group q of those 16 columns, low 2 bits = first kept index
//     (the canonical nibble encoding of sparselora/format.py, so meta is a permutation of halves).
//
//        lane:  0  1  2  3 | 4  5  6  7 | ... | 28 29 30 31
//        s=0:   A  B  -  - | A  B  -  - | ... |  A  B  -  -     A = (rows g, g+8; cols 0..15)
//        s=1:   -  -  A  B | -  -  A  B | ... |  -  -  A  B     B = (rows g, g+8; cols 16..31)
//
// GPU layout of one layer (reversible reorder of the canonical one, padded):
//   Mt = ceil(N / 16) row tiles, KT = ceil(K / 64) * 2 k-tiles of 32 dense columns,
//   KQ = ceil(KT / 8) k-blocks of 8 k-tiles (one pipeline stage).
//   values [Mt][KT][32 lanes][8]: lane l's A registers a0..a7 of k-tile kt, one 16-byte load;
//            a warp's 32 loads of one k-tile are 512 contiguous bytes.
//   meta   [Mt][KQ][32 lanes][4] int32: word w of lane l is its metadata register for k-tile
//            kt = 8 kq + 2 w + s(l), where s(l) = t >> 1 is the selector the kernel uses for it: all
//            32 lanes supply metadata (even k-tiles with s = 0, odd ones with s = 1), one 16-byte
//            load covers a lane's metadata for a whole stage.
//   Padding: values 0 (rows >= N, k-tiles past K), meta nibbles 0b0100 (a valid encoding).
#pragma once

#ifdef __CUDACC__
#define SPARSE_MMA_HD __host__ __device__ __forceinline__
#else
#define SPARSE_MMA_HD inline
#endif

namespace sparselora {
namespace sparse_mma {

constexpr int kWarp = 32;
constexpr int kTileM = 16;       // rows of W per mma
constexpr int kTileN = 8;        // tokens per mma
constexpr int kTileK = 32;       // dense columns per mma
constexpr int kTileKc = 16;      // kept (compressed) columns per mma
constexpr int kValsPerLane = 8;  // a0..a7: 16 bytes of 16-bit values
constexpr int kStageKTiles = 8;  // k-tiles per pipeline stage = per 16-byte metadata load
constexpr int kKAlign = 64;      // K is padded to whole k-tile pairs (selector 0 and 1)
constexpr unsigned kPadMetaWord = 0x44444444u;  // every nibble 0b0100: indices 0 and 1

SPARSE_MMA_HD constexpr int lane_group(int lane) { return lane >> 2; }
SPARSE_MMA_HD constexpr int lane_in_group(int lane) { return lane & 3; }

// A fragment: row (0..15) and compressed column (0..15) of register element i (0..7).
SPARSE_MMA_HD constexpr int a_row(int lane, int i) { return lane_group(lane) + ((i >> 1) & 1) * 8; }
SPARSE_MMA_HD constexpr int a_col(int lane, int i) { return lane_in_group(lane) * 2 + (i & 1) + (i >> 2) * 8; }

// B fragment: k (0..31) and token (0..7) of register element i (0..7).
SPARSE_MMA_HD constexpr int b_k(int lane, int i) { return lane_in_group(lane) * 2 + (i & 1) + (i >> 1) * 8; }
SPARSE_MMA_HD constexpr int b_n(int lane, int /*i*/) { return lane_group(lane); }

// C/D fragment: row (0..15) and token (0..7) of accumulator i (0..3).
SPARSE_MMA_HD constexpr int c_row(int lane, int i) { return lane_group(lane) + (i >> 1) * 8; }
SPARSE_MMA_HD constexpr int c_col(int lane, int i) { return lane_in_group(lane) * 2 + (i & 1); }

// Metadata: the selector under which this lane supplies metadata, which 16-column chunk of the
// k-tile its register describes, and the row of each 16-bit half (half 0: bits 0..15).
SPARSE_MMA_HD constexpr int meta_selector(int lane) { return lane_in_group(lane) >> 1; }
SPARSE_MMA_HD constexpr bool meta_supplier(int lane, int selector) { return meta_selector(lane) == selector; }
SPARSE_MMA_HD constexpr int meta_chunk(int lane) { return lane_in_group(lane) & 1; }
SPARSE_MMA_HD constexpr int meta_row(int lane, int half) { return lane_group(lane) + half * 8; }

// GPU layout sizes and offsets (elements of the values buffer, int32 words of the meta buffer).
SPARSE_MMA_HD constexpr int row_tiles(int n) { return (n + kTileM - 1) / kTileM; }
SPARSE_MMA_HD constexpr int k_tiles(int k) { return (k + kKAlign - 1) / kKAlign * (kKAlign / kTileK); }
SPARSE_MMA_HD constexpr int k_blocks(int k) { return (k_tiles(k) + kStageKTiles - 1) / kStageKTiles; }

SPARSE_MMA_HD constexpr long long values_offset(int mt, int kt, int lane, int i, int KT) {
  return ((static_cast<long long>(mt) * KT + kt) * kWarp + lane) * kValsPerLane + i;
}
SPARSE_MMA_HD constexpr long long meta_offset(int mt, int kq, int lane, int w, int KQ) {
  return ((static_cast<long long>(mt) * KQ + kq) * kWarp + lane) * 4 + w;
}
// The k-tile (within its stage) that metadata word w of a lane serves.
SPARSE_MMA_HD constexpr int meta_word_ktile(int lane, int w) { return 2 * w + meta_selector(lane); }

// x staging in shared memory: one stage holds [tokens][kStageKTiles * kTileK] 16-bit values as
// 16-byte chunks (8 columns); the chunk index is XOR-swizzled with the row so that ldmatrix's 8
// row addresses (same column) fall in 8 different bank groups.
constexpr int kXChunksPerRow = kStageKTiles * kTileK / 8;  // 32
SPARSE_MMA_HD constexpr int x_smem_chunk(int row, int chunk) { return chunk ^ (row & 7); }
// ldmatrix.x4 for the B fragment of k-tile j of a stage: lane supplies the address of row
// (token) ldm_row(lane) of matrix ldm_matrix(lane) = dense columns 8 * ldm_matrix .. + 7.
SPARSE_MMA_HD constexpr int ldm_row(int lane) { return lane & 7; }
SPARSE_MMA_HD constexpr int ldm_matrix(int lane) { return lane >> 3; }
SPARSE_MMA_HD constexpr int x_chunk_of_ktile(int j, int lane) { return j * (kTileK / 8) + ldm_matrix(lane); }

}  // namespace sparse_mma
}  // namespace sparselora
