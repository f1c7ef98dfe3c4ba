/*
 * eplb_nccl.h -- the slice of the NCCL C API that eplb_pynccl calls, declared by this project.
 *
 * The package never compiles against this file (only a layout test does). It is the contract between the Python
 * binding and libnccl: eplb_pynccl/_nccl/table.py (functions and enum values) and
 * eplb_pynccl/_nccl/config.py (the communicator config layout) must say exactly what this file
 * says, and this file must agree with the nccl.h that ships in the nvidia-nccl wheels.
 * tests/test_header.py checks both against the installed wheel; `make test-abi`
 * (tools/abi_matrix.py) checks it against the nccl.h of every NCCL minor release from 2.19 on.
 *
 * Version annotations
 * -------------------
 * A declaration that some supported NCCL releases lack carries a C comment whose whole text
 * is "since X.Y.Z" (slash-star, space, since, space, the version, space, star-slash), placed
 * directly after it on the same line: after the ';' of a struct field or a prototype, after
 * the ',' of an enumerator (or after its value when it is the last one). X.Y.Z is the first
 * NCCL release whose nccl.h has it. Every ncclConfig_t field is annotated, the oldest ones with
 * the release that introduced the struct. A declaration with no annotation is in every
 * NCCL release this project supports (2.19 and later). Count sentinels (ncclNum...) take the
 * value of the newest release; they are compared only where every member is present.
 *
 * Types are spelled the way table.py spells them (pointer stars next to the type).
 */
#ifndef EPLB_NCCL_H
#define EPLB_NCCL_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A CUDA stream is passed through untouched; only its handle type is needed here. */
typedef struct CUstream_st* cudaStream_t;

/* Communicators are opaque handles owned by the library. */
typedef struct ncclComm* ncclComm_t;

/* The rendezvous token: 128 opaque bytes, handed around by value. */
#define NCCL_UNIQUE_ID_BYTES 128
typedef struct { char internal[NCCL_UNIQUE_ID_BYTES]; } ncclUniqueId;

/* Return codes. */
typedef enum {
  ncclSuccess            = 0,
  ncclUnhandledCudaError = 1,
  ncclSystemError        = 2,
  ncclInternalError      = 3,
  ncclInvalidArgument    = 4,
  ncclInvalidUsage       = 5,
  ncclRemoteError        = 6,
  ncclInProgress         = 7,
  ncclTimeout            = 8, /* since 2.30.0 */
  ncclNumResults         = 9
} ncclResult_t;

/* Element types (the short aliases such as ncclChar/ncclHalf are left out on purpose). */
typedef enum {
  ncclInt8       = 0,
  ncclUint8      = 1,
  ncclInt32      = 2,
  ncclUint32     = 3,
  ncclInt64      = 4,
  ncclUint64     = 5,
  ncclFloat16    = 6,
  ncclFloat32    = 7,
  ncclFloat64    = 8,
  ncclBfloat16   = 9,
  ncclFloat8e4m3 = 10, /* since 2.24.0 */
  ncclFloat8e5m2 = 11 /* since 2.24.0 */
} ncclDataType_t;

/* The built-in reductions (user-defined ones start at 5 and are not used here). */
typedef enum {
  ncclSum  = 0,
  ncclProd = 1,
  ncclMax  = 2,
  ncclMin  = 3,
  ncclAvg  = 4
} ncclRedOp_t;

/*
 * Communicator options. The struct only ever grows at its end; a library reads the prefix
 * that its own release defines, found through size/magic/version. Unset ints hold INT_MIN,
 * unset strings NULL.
 */
typedef struct eplbNcclConfig {
  size_t size;                  /* since 2.14.0 */
  unsigned int magic;           /* since 2.14.0 */
  unsigned int version;         /* since 2.14.0 */
  int blocking;                 /* since 2.14.0 */
  int cgaClusterSize;           /* since 2.14.0 */
  int minCTAs;                  /* since 2.14.0 */
  int maxCTAs;                  /* since 2.14.0 */
  const char* netName;          /* since 2.14.0 */
  int splitShare;               /* since 2.18.0 */
  int trafficClass;             /* since 2.26.0 */
  const char* commName;         /* since 2.27.0 */
  int collnetEnable;            /* since 2.27.0 */
  int CTAPolicy;                /* since 2.27.0 */
  int shrinkShare;              /* since 2.27.0 */
  int nvlsCTAs;                 /* since 2.27.0 */
  int nChannelsPerNetPeer;      /* since 2.28.0 */
  int nvlinkCentricSched;       /* since 2.28.0 */
  int graphUsageMode;           /* since 2.29.0 */
  int numRmaCtx;                /* since 2.29.0 */
  int maxP2pPeers;              /* since 2.30.0 */
  int graphStreamOrdering;      /* since 2.30.5 */
  int launchOrderImplicit;      /* since 2.31.0 */
  int numRmaSig;                /* since 2.31.0 */
  int rmaEagerInit;             /* since 2.31.0 */
  int hostCftMode;              /* since 2.31.0 */
  int nvlsHostMode;             /* since 2.32.0 */
} ncclConfig_t;

/* Library and error information. */
ncclResult_t ncclGetVersion(int* version);
const char* ncclGetErrorString(ncclResult_t result);
const char* ncclGetLastError(ncclComm_t comm);

/* Communicator life cycle. */
ncclResult_t ncclGetUniqueId(ncclUniqueId* uniqueId);
ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId commId, int rank);
ncclResult_t ncclCommInitRankConfig(ncclComm_t* comm, int nranks, ncclUniqueId commId, int rank,
                                    ncclConfig_t* config);
ncclResult_t ncclCommFinalize(ncclComm_t comm);
ncclResult_t ncclCommDestroy(ncclComm_t comm);
ncclResult_t ncclCommAbort(ncclComm_t comm);
ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* asyncError);

/* Communicator queries. */
ncclResult_t ncclCommCount(const ncclComm_t comm, int* count);
ncclResult_t ncclCommCuDevice(const ncclComm_t comm, int* device);
ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank);

/* Point-to-point transfers and grouping. */
ncclResult_t ncclSend(const void* sendbuff, size_t count, ncclDataType_t datatype, int peer,
                      ncclComm_t comm, cudaStream_t stream);
ncclResult_t ncclRecv(void* recvbuff, size_t count, ncclDataType_t datatype, int peer,
                      ncclComm_t comm, cudaStream_t stream);
ncclResult_t ncclGroupStart(void);
ncclResult_t ncclGroupEnd(void);

/* The collectives this project uses. */
ncclResult_t ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count,
                           ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                           cudaStream_t stream);
ncclResult_t ncclAllGather(const void* sendbuff, void* recvbuff, size_t sendcount,
                           ncclDataType_t datatype, ncclComm_t comm, cudaStream_t stream);
ncclResult_t ncclBroadcast(const void* sendbuff, void* recvbuff, size_t count,
                           ncclDataType_t datatype, int root, ncclComm_t comm,
                           cudaStream_t stream);

/* Buffer registration and NCCL-allocated memory. */
ncclResult_t ncclCommRegister(const ncclComm_t comm, void* buff, size_t size, void** handle);
ncclResult_t ncclCommDeregister(const ncclComm_t comm, void* handle);
ncclResult_t ncclMemAlloc(void** ptr, size_t size);
ncclResult_t ncclMemFree(void* ptr);

#ifdef __cplusplus
}
#endif

#endif /* EPLB_NCCL_H */
