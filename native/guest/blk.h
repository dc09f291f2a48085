/* The `blk*` actions on the first virtio block device (docs/machine.md). */
#ifndef GUEST_BLK_H
#define GUEST_BLK_H

#include "types.h"

void blk_info(void);
void blk_write(const char *args); /* sector,count[,seed] */
void blk_read(const char *args);  /* sector,count */
void blk_verify(const char *args); /* sector,count[,seed] */
void blk_loop(const char *args);   /* sector,count,passes: blkwrite with seeds 1..passes */
void blk_flush(void);
void blk_bench(const char *args); /* randread,ops | seqread,mib */

#endif
