/*
 * pct-readrate DIR [MB]: the lab guest's file-read throughput probe (tools/bench-paper.sh).
 *
 * Once a second, reads the next MB megabytes (default 32) of the regular files under DIR,
 * going round them in a loop, and prints how fast that read went:
 *
 *     PCT-READRATE <sample> <MB/s>
 *
 * Served from the page cache the rate is the guest's memory-copy speed; after the cache was
 * dropped it is the virtual disk's, until the files are cached again. A fixed amount per
 * second, not a read as fast as it goes: a reader that never stops keeps rewriting its
 * buffer and the accessed bits of the pages it reads, and a stock migration over a slow
 * link then never converges.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static char **files;
static size_t nfiles, capfiles;

static int add(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
	(void)ftw;
	if (type != FTW_F || !S_ISREG(st->st_mode))
		return 0;
	if (nfiles == capfiles) {
		capfiles = capfiles ? 2 * capfiles : 1024;
		files = realloc(files, capfiles * sizeof(*files));
		if (!files) {
			perror("pct-readrate: realloc");
			exit(1);
		}
	}
	files[nfiles] = strdup(path);
	if (!files[nfiles]) {
		perror("pct-readrate: strdup");
		exit(1);
	}
	nfiles++;
	return 0;
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	static char buf[1 << 16];
	unsigned long sample = 0;
	unsigned long long budget;
	size_t i = 0;
	int fd = -1;

	if (argc != 2 && argc != 3) {
		fprintf(stderr, "usage: pct-readrate DIR [MB]\n");
		return 2;
	}
	budget = (argc == 3 ? strtoull(argv[2], NULL, 10) : 32) << 20;
	if (budget == 0 || nftw(argv[1], add, 16, FTW_PHYS) != 0 || nfiles == 0) {
		fprintf(stderr, "pct-readrate: no files under %s (or a zero amount)\n", argv[1]);
		return 1;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	for (;;) {
		unsigned long long bytes = 0;
		double start = now(), took;

		while (bytes < budget) {
			ssize_t n;

			if (fd < 0) {
				fd = open(files[i], O_RDONLY);
				i = (i + 1) % nfiles;
				if (fd < 0)
					continue;
			}
			n = read(fd, buf, sizeof(buf));
			if (n <= 0) {
				close(fd);
				fd = -1;
				continue;
			}
			bytes += n;
		}
		took = now() - start;
		printf("PCT-READRATE %lu %.1f\n", ++sample, bytes / took / 1e6);
		if (took < 1)
			usleep((useconds_t)((1 - took) * 1e6));
	}
}
