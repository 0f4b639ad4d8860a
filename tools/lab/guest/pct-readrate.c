/*
 * pct-readrate DIR: the lab guest's file-read throughput probe (tools/bench-paper.sh).
 *
 * Reads every regular file under DIR, over and over, and prints once a second how much it
 * read in that second:
 *
 *     PCT-READRATE <second> <MB/s>
 *
 * Served from the page cache the rate is the guest's memory-copy speed; after the cache was
 * dropped it is the virtual disk's, until the files are cached again.
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
	static char buf[1 << 18];
	unsigned long long bytes = 0;
	unsigned long second = 0;
	double next;
	size_t i;

	if (argc != 2) {
		fprintf(stderr, "usage: pct-readrate DIR\n");
		return 2;
	}
	if (nftw(argv[1], add, 16, FTW_PHYS) != 0 || nfiles == 0) {
		fprintf(stderr, "pct-readrate: no files under %s\n", argv[1]);
		return 1;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	next = now() + 1;
	for (i = 0;; i = (i + 1) % nfiles) {
		int fd = open(files[i], O_RDONLY);
		ssize_t n;

		if (fd < 0)
			continue;
		while ((n = read(fd, buf, sizeof(buf))) > 0) {
			double t;

			bytes += n;
			t = now();
			if (t >= next) {
				/* A late tick (the guest was paused) reports the whole gap. */
				double span = t - next + 1;

				printf("PCT-READRATE %lu %.1f\n", ++second, bytes / span / 1e6);
				bytes = 0;
				next = t + 1;
			}
		}
		close(fd);
	}
}
